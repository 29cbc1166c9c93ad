"""Published CLIP checkpoints in our names: transformers CLIP -> open_clip, open_clip state dicts, pickled modules.

Every converter maps a source's keys onto open_clip's image-encoder keys (``visual.*``, the names of
:class:`vision.models.ImageClassifier`'s parameters) and accounts for every other key: either a known part of
the model that is not the image encoder (text tower, logit scale, position-id buffers), returned as ignored, or
an error naming it. Pickled modules (the task_vectors checkpoints) are only ever unpickled in a child process
(:func:`unpickle_to_safetensors`), which writes their tensors to safetensors for this process to read.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["hf_clip_to_open_clip", "convert_hf_clip", "convert_open_clip", "Converted", "encoder_activation",
           "encoder_architecture", "hf_config_activation", "hf_config_architecture", "unpickle_to_safetensors",
           "PICKLE_WARNING", "SOURCES", "Source", "FileSpec"]

REPO_ROOT = Path(__file__).resolve().parents[1]
PICKLE_WARNING = ("WARNING: unpickling {path} with torch.load(weights_only=False) runs whatever code the file "
                  "names; do this only for files you trust (the official task_vectors checkpoints). It runs in a "
                  "separate process and only its tensors come back, as safetensors.")

# transformers CLIP vision-tower key (after the ``vision_model.`` prefix) -> open_clip ``visual.`` key
_HF_FIXED = {
    "embeddings.class_embedding": "visual.class_embedding",
    "embeddings.patch_embedding.weight": "visual.conv1.weight",
    "embeddings.position_embedding.weight": "visual.positional_embedding",
    "pre_layrnorm.weight": "visual.ln_pre.weight",  # (sic: transformers' spelling)
    "pre_layrnorm.bias": "visual.ln_pre.bias",
    "post_layernorm.weight": "visual.ln_post.weight",
    "post_layernorm.bias": "visual.ln_post.bias",
}
_HF_LAYER = {
    "self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
}
_HF_LAYER_RE = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF_QKV_RE = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
_HF_VISION_ROOTS = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")
# parts of a transformers CLIPModel that are not the image encoder
_HF_IGNORED = re.compile(r"^(text_model\..*|text_projection\.weight|logit_scale"
                         r"|(vision_model\.)?embeddings\.position_ids)$")
# parts of an open_clip CLIP (task_vectors / TALL-masks ImageEncoder.model) that are not the image encoder
_OC_IGNORED = re.compile(r"^(transformer\..*|token_embedding\..*|positional_embedding|ln_final\..*|text_projection"
                         r"|logit_scale|logit_bias|attn_mask)$")


@dataclass
class Converted:
    """Image-encoder tensors in open_clip names, and the source keys that are known but not the image encoder."""

    tensors: dict[str, Tensor]
    ignored: list[str] = field(default_factory=list)


def _names(keys: Sequence[str], n: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def convert_hf_clip(state_dict: Mapping[str, Tensor]) -> Converted:
    """A transformers ``CLIPModel`` / ``CLIPVisionModel`` state dict (vision keys with or without the
    ``vision_model.`` prefix) in open_clip names; q/k/v projections are fused into ``in_proj_*`` (rows q, k, v,
    as ``nn.MultiheadAttention`` splits them), ``visual_projection.weight`` [E, D] becomes ``visual.proj`` [D, E].
    Raises ValueError naming unknown keys or incomplete q/k/v triples."""
    out: dict[str, Tensor] = {}
    ignored, unknown = [], []
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, t in state_dict.items():
        if _HF_IGNORED.match(key):
            ignored.append(key)
            continue
        if key == "visual_projection.weight":
            out["visual.proj"] = t.T.contiguous()  # Linear weight [E, D] -> open_clip x @ proj, proj [D, E]
            continue
        k = key.removeprefix("vision_model.")
        if k == key and not k.startswith(_HF_VISION_ROOTS):
            unknown.append(key)
            continue
        if k in _HF_FIXED:
            new = _HF_FIXED[k]
        elif m := _HF_QKV_RE.match(k):
            qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = t
            continue
        elif (m := _HF_LAYER_RE.match(k)) and m[2] in _HF_LAYER:
            new = f"visual.transformer.resblocks.{m[1]}.{_HF_LAYER[m[2]]}.{m[3]}"
        else:
            unknown.append(key)
            continue
        if new in out:
            raise ValueError(f"two source keys map to {new} (both with and without the vision_model. prefix?)")
        out[new] = t
    if unknown:
        raise ValueError(f"unknown keys in the transformers CLIP state dict: {_names(unknown)}")
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"layer {layer} has only the {sorted(parts)} projections' {kind}, not q, k and v")
        out[f"visual.transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0)  # [3D, D] or [3D]
    return Converted(out, sorted(ignored))


def hf_clip_to_open_clip(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """open_clip ``visual.*`` tensors of a transformers CLIP state dict (see :func:`convert_hf_clip`)."""
    return convert_hf_clip(state_dict).tensors


def convert_open_clip(state_dict: Mapping[str, Any], prefix: str = "model.") -> Converted:
    """An open_clip CLIP state dict, its keys prefixed with ``prefix`` (``model.`` for the task_vectors /
    TALL-masks ``ImageEncoder``) or not: ``visual.*`` kept, the text tower and logit scale ignored, any other
    key an error. Non-tensor entries (a ``model_name`` string) are ignored."""
    out: dict[str, Tensor] = {}
    ignored, unknown = [], []
    for key, t in state_dict.items():
        k = key[len(prefix):] if prefix and key.startswith(prefix) else key
        if not isinstance(t, Tensor):
            ignored.append(key)
        elif k.startswith("visual."):
            out[k] = t
        elif _OC_IGNORED.match(k):
            ignored.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unknown keys in the open_clip state dict: {_names(unknown)}")
    if not out:
        raise ValueError(f"no image-encoder keys ('{prefix}visual.*') in the state dict")
    return Converted(out, sorted(ignored))


def encoder_activation(module: nn.Module) -> str:
    """'quick_gelu' or 'gelu' (or 'gelu_tanh'): the MLP activation of every block of an open_clip encoder,
    read from the built modules; raises when there is none or the blocks disagree."""
    found = set()
    for m in module.modules():
        name = type(m).__name__
        if name == "QuickGELU":
            found.add("quick_gelu")
        elif isinstance(m, nn.GELU):
            found.add("gelu" if m.approximate == "none" else "gelu_tanh")
    if len(found) != 1:
        raise ValueError(f"cannot tell the encoder's activation: found {sorted(found) or 'none'}")
    return found.pop()


def encoder_architecture(visual: nn.Module) -> dict[str, int]:
    """Width, depth, heads, MLP width, patch and image size of an open_clip VisionTransformer."""
    blocks = visual.transformer.resblocks
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    patch = visual.patch_size if isinstance(visual.patch_size, int) else visual.patch_size[0]
    return {"hidden_size": int(visual.conv1.out_channels), "num_hidden_layers": len(blocks),
            "num_attention_heads": int(blocks[0].attn.num_heads),
            "intermediate_size": int(blocks[0].mlp.c_fc.out_features), "patch_size": int(patch),
            "image_size": int(size)}


def _vision_config(config: Mapping[str, Any]) -> Any:
    """The vision tower's ``CLIPVisionConfig`` of a config.json (CLIPModel nests it; CLIPVisionModel is it),
    with transformers' defaults for the fields a saved config leaves out (recent versions write only
    non-defaults; the defaults are ViT-B/32's, ``quick_gelu`` included)."""
    from transformers import CLIPVisionConfig

    vc = dict(config.get("vision_config") or config)
    vc.pop("architectures", None)
    return CLIPVisionConfig.from_dict(vc)


def hf_config_activation(config: Mapping[str, Any]) -> str:
    """The vision tower's ``hidden_act`` of a transformers CLIP config.json ('quick_gelu', 'gelu', ...)."""
    act = _vision_config(config).hidden_act
    return {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}.get(act, act)


def hf_config_architecture(config: Mapping[str, Any]) -> dict[str, int]:
    """The :func:`encoder_architecture` fields of a transformers CLIP config.json."""
    vc = _vision_config(config)
    return {k: int(getattr(vc, k)) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                             "intermediate_size", "patch_size", "image_size")}


# ----------------------------------------------------------------------------------------------------------
# Pickled modules: only in a child process
# ----------------------------------------------------------------------------------------------------------
def unpickle_to_safetensors(pairs: Sequence[tuple[str | os.PathLike, str | os.PathLike]],
                            code_paths: Sequence[str | os.PathLike] = ()) -> list[dict[str, str]]:
    """Unpickle each ``src`` of ``pairs`` (``torch.save(module)`` files) in one separate Python process and
    write its state dict's tensors to the safetensors file ``dst``; returns, per pair, the metadata the child
    recorded (``activation``, ``class``, ``non_tensor_keys``). ``code_paths`` go first on the child's
    ``sys.path`` (the authors' source tree, whose classes the pickles name). The warning is printed first."""
    for src, _ in pairs:
        print(PICKLE_WARNING.format(path=src), file=sys.stderr, flush=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, code_paths), str(REPO_ROOT),
                                         *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-c", "import sys; from vision.checkpoints import _child; _child(sys.argv[1:])",
           *[str(x) for pair in pairs for x in pair]]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-6:])
        raise ValueError(f"could not unpickle {', '.join(str(p[0]) for p in pairs)} (exit {proc.returncode}); pass "
                         f"the folder holding the code they name with --pickle-code-path. The child said:\n{tail}")
    from safetensors import safe_open

    out = []
    for _, dst in pairs:
        with safe_open(str(dst), framework="pt") as f:
            out.append(dict(f.metadata() or {}))
    return out


def _child(argv: Sequence[str]) -> None:
    """The child process of :func:`unpickle_to_safetensors`: load, take the state dict, save safetensors."""
    for src, dst in zip(argv[::2], argv[1::2]):
        _unpickle_one(src, dst)


def _unpickle_one(src: str, dst: str) -> None:
    import json

    from safetensors.torch import save_file

    obj = torch.load(src, map_location="cpu", weights_only=False)  # the one arbitrary unpickling, isolated here
    sd = obj.state_dict() if isinstance(obj, nn.Module) else obj
    if not isinstance(sd, Mapping):
        raise SystemExit(f"{src} holds a {type(obj).__name__}, neither a module nor a state dict")
    tensors = {k: v.detach().contiguous().clone() for k, v in sd.items() if isinstance(v, Tensor)}
    meta = {"class": f"{type(obj).__module__}.{type(obj).__qualname__}",
            "non_tensor_keys": json.dumps(sorted(str(k) for k, v in sd.items() if not isinstance(v, Tensor)))}
    if isinstance(obj, nn.Module):
        try:
            meta["activation"] = encoder_activation(obj)
        except ValueError:
            pass
    save_file(tensors, dst, metadata=meta)


# ----------------------------------------------------------------------------------------------------------
# Where each source keeps its files (checked on the hub pages and the projects' code in November 2026)
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileSpec:
    """Files of one checkpoint: ``repo_id`` (None: the --from folder itself) and, per role ('weights',
    'config'), candidate paths inside it in order of preference (matched case-insensitively)."""

    repo_id: str | None
    files: Mapping[str, tuple[str, ...]]


@dataclass(frozen=True)
class Source:
    """A publisher of fine-tuned CLIP image encoders: its file format, names and layout.

    ``kind``: 'transformers' (config.json + safetensors/bin of a CLIP(Vision)Model), 'state_dict' (a
    ``torch.save`` of an open_clip state dict, read with ``weights_only=True``) or 'pickle' (a whole pickled
    module: needs --allow-pickle). ``activation``: the MLP activation the source's files were trained with
    when the files cannot say it themselves.
    """

    name: str
    kind: str
    repo_id: str | None
    models: Mapping[str, str]  # our --model -> the source's name (others: --source-model)
    tasks: Mapping[str, str] | None  # our task -> the source's name (None: the same names as ours)
    finetuned: Any  # (source model, source task) -> FileSpec
    pretrained: Any  # (source model, source task) -> FileSpec
    activation: str | None = None
    note: str = ""

    def model_name(self, model: str, override: str | None = None) -> str:
        """The source's name of our ``--model``; raises listing the known ones."""
        if override:
            return override
        if model not in self.models:
            raise ValueError(f"{self.name} has no name for --model {model} (known: {', '.join(self.models)}); "
                             "pass --source-model")
        return self.models[model]

    def task_name(self, task: str, overrides: Mapping[str, str]) -> str:
        """The source's name of our task ``task``."""
        if task in overrides:
            return overrides[task]
        if self.tasks is None:
            return task
        if task not in self.tasks:
            raise ValueError(f"{self.name} has no name for task {task} (known: {', '.join(self.tasks)}); "
                             f"pass --source-name {task}=<its name>")
        return self.tasks[task]


_OPENAI_HF = {"ViT-B-32": "clip-vit-base-patch32", "ViT-B-16": "clip-vit-base-patch16",
              "ViT-L-14": "clip-vit-large-patch14"}
#: FusionBench's task suffixes (config/model/clip-vit/*.yaml of tanganke/fusion_bench): the 8 tasks of Ilharco
#: et al., then the rest of the 14/20-task suites of TALL-masks.
_FUSIONBENCH_TASKS = {
    "Cars": "stanford-cars", "DTD": "dtd", "EuroSAT": "eurosat", "GTSRB": "gtsrb", "MNIST": "mnist",
    "RESISC45": "resisc45", "SUN397": "sun397", "SVHN": "svhn", "STL10": "stl10", "OxfordIIITPet": "oxford-iiit-pet",
    "Flowers102": "oxford_flowers102", "CIFAR100": "cifar100", "PCAM": "pcam", "FER2013": "fer2013",
    "CIFAR10": "cifar10", "Food101": "food101", "FashionMNIST": "fashion_mnist", "RenderedSST2": "rendered-sst2",
    "EMNIST": "emnist_letters", "KMNIST": "kmnist",
}
_HF_FILES = {"config": ("config.json",), "weights": ("model.safetensors", "pytorch_model.bin")}

SOURCES_LIST = (
    Source("fusionbench", "transformers", None, _OPENAI_HF, _FUSIONBENCH_TASKS,
           finetuned=lambda m, t: FileSpec(f"tanganke/{m}_{t}", _HF_FILES),
           pretrained=lambda m, t: FileSpec(f"openai/{m}", _HF_FILES),
           note="transformers CLIPVisionModel per task (tanganke/<model>_<task>), θ0 = openai/<model>"),
    Source("tall_masks", "state_dict", "nik-dim/tall_masks", {m: m for m in _OPENAI_HF}, None,
           finetuned=lambda m, t: FileSpec("nik-dim/tall_masks",
                                           {"weights": (f"single_task/{m}/{t}Val/nonlinear_finetuned.pt",)}),
           pretrained=lambda m, t: FileSpec("nik-dim/tall_masks", {"weights": (
               f"single_task/{m}/zeroshot.pt", f"single_task/{m}/nonlinear_zeroshot.pt",
               f"single_task/{m}/{t}Val/nonlinear_zeroshot.pt")}),
           # their environment.yml pins open_clip 2.10.1, whose openai weights load with QuickGELU (the state dicts
           # cannot say it themselves)
           activation="quick_gelu",
           note="open_clip ImageEncoder state dicts (keys model.*), single_task/<model>/<Task>Val/"),
    Source("task_vectors", "pickle", None, {m: m for m in _OPENAI_HF}, None,
           finetuned=lambda m, t: FileSpec(None, {"weights": (f"{m}/{t}/finetuned.pt",)}),
           pretrained=lambda m, t: FileSpec(None, {"weights": (f"{m}/zeroshot.pt",)}),
           note="pickled ImageEncoder modules of Ilharco et al. (<model>/<Task>/finetuned.pt, <model>/zeroshot.pt); "
                "no hub copy by default: --from the downloaded folder or --repo-id a mirror"),
)


def _registry():
    from talos.registry import Registry

    reg: Registry[Source] = Registry("checkpoint source")
    for s in SOURCES_LIST:
        reg.register(s.name)(s)
    return reg


SOURCES = _registry()
