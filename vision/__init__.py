"""Vision adapter: CLIP ViT task arithmetic (open_clip)."""
