"""CLIP image classifiers from open_clip: loading, zero-shot heads, and which parameters TaLoS may touch."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger("talos")

CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
#: Architectures this project adds to open_clip's registry (tiny, for tests and smoke runs).
TINY_MODELS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
_registered = False


def register_model_configs() -> None:
    """Add ``vision/model_configs/*.json`` to open_clip's model registry (idempotent)."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def check_model_name(name: str) -> None:
    """Raise ValueError (listing examples) if ``name`` is not an open_clip architecture or a tiny config."""
    import open_clip

    register_model_configs()
    if name.startswith(("hf-hub:", "local-dir:")):
        return
    models = open_clip.list_models()
    if name not in models:
        vits = [m for m in models if m.startswith("ViT-")][:12]
        raise ValueError(f"unknown model {name!r}; valid choices include: {', '.join(vits + list(TINY_MODELS))} "
                         "(see open_clip.list_models())")


ACTIVATIONS = ("auto", "quick_gelu", "gelu")


def _is_tag(pretrained: str | None) -> bool:
    return pretrained not in (None, "", "none") and not Path(str(pretrained)).expanduser().is_file()


def resolve_activation(name: str, pretrained: str | None, requested: str = "auto",
                       allow_mismatch: bool = False) -> str:
    """The MLP activation of the image/text towers: ``"quick_gelu"`` or ``"gelu"``.

    ``auto`` follows the pretrained tag's open_clip config (``quick_gelu: True`` for every ``openai`` tag: the
    weights were trained with QuickGELU, and open_clip >= 2.24 no longer forces it, see PR #970), else the
    architecture's own config (the ``-quickgelu`` names). An explicit ``requested`` activation that differs
    from the tag's raises ValueError unless ``allow_mismatch``. Reads configs only; nothing is downloaded.
    """
    import open_clip

    register_model_configs()
    if requested not in ACTIVATIONS:
        raise ValueError(f"unknown activation {requested!r}; valid choices: {', '.join(ACTIVATIONS)}")
    cfg = open_clip.get_model_config(name) or {}
    expected = "quick_gelu" if cfg.get("quick_gelu", False) else "gelu"
    tag_act = None
    if _is_tag(pretrained):
        tag_cfg = open_clip.get_pretrained_cfg(name, str(pretrained)) or {}
        if tag_cfg:
            tag_act = expected = "quick_gelu" if tag_cfg.get("quick_gelu", False) else "gelu"
    if requested == "auto":
        return expected
    if tag_act is not None and requested != tag_act and not allow_mismatch:
        raise ValueError(f"--activation {requested} does not match pretrained tag {pretrained!r} of {name}, whose "
                         f"weights were trained with {tag_act}; use --activation auto, or pass "
                         "--allow-activation-mismatch to run with it anyway")
    return requested


def load_clip(name: str, pretrained: str | None, cache_dir: str | None = None, device: str = "cpu",
              activation: str = "auto"):
    """(clip_model, train_preprocess, val_preprocess, tokenizer). ``pretrained`` 'none' = random init.

    ``activation`` (see :func:`resolve_activation`; ``auto`` resolves it from the tag) is enforced on the built
    model whatever open_clip's own default is, so OpenAI weights always run with QuickGELU.
    """
    import open_clip

    register_model_configs()
    act = resolve_activation(name, pretrained, activation, allow_mismatch=True) if activation == "auto" else activation
    if act not in ACTIVATIONS[1:]:
        raise ValueError(f"unknown activation {activation!r}; valid choices: {', '.join(ACTIVATIONS)}")
    tag = None if pretrained in (None, "", "none") else pretrained
    kwargs: dict[str, Any] = {"force_quick_gelu": True} if act == "quick_gelu" else {"quick_gelu": False}
    model, train_pre, val_pre = open_clip.create_model_and_transforms(
        name, pretrained=tag, cache_dir=cache_dir, device=device, **kwargs
    )
    tokenizer = open_clip.get_tokenizer(name)
    return model, train_pre, val_pre, tokenizer


def official_leftover_entries(name: str) -> int:
    """Entries of the text tower's leftovers in the official code's image-encoder state dict.

    The official ``ImageEncoder`` deletes only CLIP's text ``transformer``, so its task vectors also hold
    ``token_embedding``, ``positional_embedding``, ``ln_final``, ``text_projection`` and ``logit_scale`` (all
    zero, never trained); the official TIES counts them in its global top-k. 0 for models whose text tower is
    not open_clip's own (the official code does not support them). Reads the config only.
    """
    import open_clip

    register_model_configs()
    cfg = open_clip.get_model_config(name) or {}
    t = cfg.get("text_cfg", {})
    if not cfg or "hf_model_name" in t or cfg.get("custom_text"):
        return 0
    width, embed = int(t.get("width", 512)), int(cfg["embed_dim"])
    return int(t.get("vocab_size", 49408)) * width + int(t.get("context_length", 77)) * width + 2 * width \
        + width * embed + 1


def text_ln_final_entries(name: str) -> int:
    """Entries of the text tower's final LayerNorm (weight + bias), 0 where open_clip's own text tower is not used."""
    import open_clip

    register_model_configs()
    cfg = open_clip.get_model_config(name) or {}
    t = cfg.get("text_cfg", {})
    if not cfg or "hf_model_name" in t or cfg.get("custom_text"):
        return 0
    return 2 * int(t.get("width", 512))


def model_activation(model: nn.Module) -> str:
    """``"quick_gelu"`` or ``"gelu"``: the activation the built open_clip model actually uses."""
    from open_clip.transformer import QuickGELU

    acts = {type(m) for m in model.modules() if isinstance(m, (QuickGELU, nn.GELU))}
    if acts == {QuickGELU}:
        return "quick_gelu"
    if acts == {nn.GELU}:
        return "gelu"
    raise ValueError(f"cannot tell the activation of this model (found {sorted(a.__name__ for a in acts)})")


class ImageClassifier(nn.Module):
    """CLIP image encoder + a frozen zero-shot head: logits = normalize(visual(x)) @ head.T.

    The head is a buffer (scaled by CLIP's logit scale), so it never appears among trainable parameters.
    """

    def __init__(self, visual: nn.Module, head: Tensor) -> None:
        super().__init__()
        self.visual = visual
        self.register_buffer("head", head)  # (C, D)

    def set_head(self, head: Tensor) -> None:
        """Swap the classification head (one per task), keeping the encoder."""
        self.head = head.to(self.head.device, self.head.dtype).contiguous()

    def forward(self, images: Tensor) -> Tensor:
        feats = F.normalize(self.visual(images), dim=-1)  # (B, D)
        return feats @ self.head.T  # (B, C)


@torch.no_grad()
def zeroshot_head(clip_model: nn.Module, tokenizer: Any, classnames: Sequence[str], templates: Sequence[Any],
                  device: str = "cpu") -> Tensor:
    """Class embeddings [C, D]: templates filled with each class name, encoded, normalised, averaged,
    renormalised (open_clip's builder), times the logit scale."""
    from open_clip import build_zero_shot_classifier

    clip_model.eval()
    w = build_zero_shot_classifier(clip_model, tokenizer=tokenizer, classnames=list(classnames),
                                   templates=list(templates), num_classes_per_batch=10, device=device,
                                   use_tqdm=False)  # (D, C)
    return (clip_model.logit_scale.exp() * w.T).float().cpu().contiguous()  # (C, D), same layout as cached


def head_key(classnames: Sequence[str], templates: Sequence[Any]) -> str:
    """A short hash of the class names and templates (part of a cached head's file name)."""
    t = [x if isinstance(x, str) else x("{}") for x in templates]
    return hashlib.sha256(json.dumps([list(classnames), t]).encode()).hexdigest()[:10]


# Modules whose parameters TaLoS scores and may fine-tune (paper-notes §1.3).
_ELIGIBLE_MODULES = (nn.Conv2d, nn.Linear, nn.LayerNorm, nn.MultiheadAttention)


def split_parameters(classifier: ImageClassifier, freeze_embeddings: bool) -> tuple[list[str], list[str]]:
    """(eligible, dense) parameter names of the image encoder.

    Eligible: patch-embedding conv, attention in/out projections, MLP linears, layer norms. The rest of the
    encoder (class and positional embeddings, output projection, and any other direct parameter) is trained
    densely as in the official code, or frozen with ``freeze_embeddings`` (exactly sparse task vectors).
    """
    eligible, dense = [], []
    owner = {}
    for mname, mod in classifier.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = mod
    for n, _ in classifier.named_parameters():
        if not n.startswith("visual."):
            continue
        if isinstance(owner[n], _ELIGIBLE_MODULES):
            eligible.append(n)
        elif not freeze_embeddings:
            dense.append(n)
    return eligible, dense


def lora_targets(classifier: nn.Module) -> dict[str, list[slice]]:
    """LoRA targets of the image encoder: the q and v row blocks of every attention's fused in-projection."""
    out = {}
    for name, mod in classifier.named_modules():
        if isinstance(mod, nn.MultiheadAttention) and name.startswith("visual"):
            E = mod.embed_dim
            out[f"{name}.in_proj_weight"] = [slice(0, E), slice(2 * E, 3 * E)]
    return out
