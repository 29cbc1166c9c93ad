"""Non-linear fine-tuning: dense AdamW on every eligible parameter."""
from .base import FinetuneMode, register_mode


@register_mode
class Standard(FinetuneMode):
    """Non-linear fine-tuning: dense AdamW on every eligible parameter."""

    name = "standard"
