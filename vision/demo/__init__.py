"""The offline demo: a procedurally generated image-caption world, a toy CLIP pre-trained on it, and the
whole TaLoS pipeline (every registered mode, addition, negation, merges, figures) on a laptop CPU.

    bash launch_scripts/demo.sh out/demo

Modules: ``world`` (scenes, captions, task image folders), ``tasks`` (dataset registration),
``pretrain`` (the toy CLIP's contrastive pre-training), ``run`` (the pipeline driver), ``figures``.
"""
from pathlib import Path

#: The committed checkpoint of ``talos-toy-clip`` (see toy_clip.json for the command that produced it).
CHECKPOINT = Path(__file__).resolve().parent / "toy_clip.safetensors"
MODEL = "talos-toy-clip"
