"""Language models for the NLP adapter: seq2seq (T5) and causal LMs, and which parameters TaLoS may touch
(the exact per-example Fisher rules for GPT-2's Conv1D and the T5/Llama RMS norms are built into talos.fisher).

``--model`` accepts ``t5-small`` / ``t5-base`` / ``t5-large`` (aliases of the ``google-t5`` hub repos), any
hub id or local folder of a seq2seq (``AutoModelForSeq2SeqLM``) or causal (``AutoModelForCausalLM``: GPT-2,
Llama, Qwen ...) model, or a tiny test config from ``nlp/model_configs`` (``talos-tiny-t5``,
``talos-tiny-gpt2``), which is built from its JSON with the vocabulary of ``--tokenizer`` and a fixed
initialisation seed, so every script builds the same θ0 without any download.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("talos")

CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
#: Tiny architectures of this project (random init; tests and smoke runs).
TINY_MODELS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
#: Short names of the paper's models -> hub repos.
MODEL_ALIASES = {"t5-small": "google-t5/t5-small", "t5-base": "google-t5/t5-base", "t5-large": "google-t5/t5-large"}
KINDS = ("seq2seq", "causal")
#: Seed of the random initialisation of tiny configs (independent of --seed, so θ0 is the same everywhere).
TINY_INIT_SEED = 0
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")  # both accept the custom 4D masks of nlp.scoring


# ----------------------------------------------------------------------------------------------------------
# Names and configs
# ----------------------------------------------------------------------------------------------------------
def is_tiny(name: str) -> bool:
    """True for the project's tiny test configs."""
    return name in TINY_MODELS


def resolve_model_name(name: str) -> str:
    """Hub id or path behind ``name`` (aliases resolved; tiny names and other ids returned unchanged)."""
    return MODEL_ALIASES.get(name, name)


def _tiny_config_dict(name: str) -> dict[str, Any]:
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


def load_config(name: str, cache_dir: str | None = None) -> Any:
    """The transformers config of ``name`` (tiny JSON, local folder or hub id; only config.json is fetched)."""
    from transformers import AutoConfig

    if is_tiny(name):
        d = _tiny_config_dict(name)
        return AutoConfig.for_model(d.pop("model_type"), **d)
    return AutoConfig.from_pretrained(resolve_model_name(name), cache_dir=cache_dir)


def model_kind(config: Any) -> str:
    """``"seq2seq"`` for encoder-decoder models, ``"causal"`` for decoder-only LMs; ValueError otherwise."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING

    if getattr(config, "is_encoder_decoder", False) and type(config) in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING:
        return "seq2seq"
    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING and not getattr(config, "is_encoder_decoder", False):
        return "causal"
    raise ValueError(f"model type {config.model_type!r} is neither a seq2seq LM nor a causal LM")


def check_model_name(name: str, cache_dir: str | None = None) -> str:
    """Validate ``--model`` before any weights load (reads only its config); returns its kind.

    Raises ValueError naming the valid choices for a name that is neither a tiny config, an alias, a local
    model folder nor a reachable hub id, or whose config is not a seq2seq / causal LM.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("--model must be a non-empty string")
    try:
        config = load_config(name, cache_dir)
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, hub/http errors: all mean "cannot use it"
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if name in MODEL_ALIASES:
            raise ValueError(f"cannot read the config of {name} ({MODEL_ALIASES[name]}): {why}; it is downloaded "
                             "from the Hugging Face hub on first use (offline: fetch it once, or pass a local "
                             "model folder)") from None
        raise ValueError(
            f"unknown model {name!r} ({why}); valid: {', '.join(list(MODEL_ALIASES) + list(TINY_MODELS))}, a local "
            "model folder, or a Hugging Face hub id of a seq2seq or causal language model (e.g. google-t5/t5-base, "
            "openai-community/gpt2, Qwen/Qwen2.5-0.5B)"
        ) from None
    return model_kind(config)


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------
def load_tokenizer(name_or_path: str, cache_dir: str | None = None) -> Any:
    """A (fast) tokenizer by hub id or local folder, with a pad token (decoder-only LMs often lack one)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_name(name_or_path), cache_dir=cache_dir)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer {name_or_path!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token  # padding is always masked explicitly, so any id works
    return tok


def load_model(
    name: str,
    tokenizer: Any,
    *,
    cache_dir: str | None = None,
    attn_implementation: str = "sdpa",
    config: Any = None,
) -> tuple[nn.Module, str]:
    """(model in float32, kind). Tiny configs are built with ``tokenizer``'s vocabulary and a fixed seed; so is
    an explicit transformers ``config`` (e.g. the released T5 sizes in ``benchmarks/efficiency.py``: random
    init, no download), which keeps its own vocabulary when ``tokenizer`` is None."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}")
    random_init = config is not None or is_tiny(name)
    config = config if config is not None else load_config(name, cache_dir)
    kind = model_kind(config)
    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    if random_init:
        if tokenizer is not None:
            config.vocab_size = len(tokenizer)
            config.pad_token_id = tokenizer.pad_token_id
            config.eos_token_id = tokenizer.eos_token_id
            bos = tokenizer.bos_token_id
            config.bos_token_id = bos if bos is not None else tokenizer.eos_token_id
            if kind == "seq2seq":
                config.decoder_start_token_id = tokenizer.pad_token_id
        with torch.random.fork_rng(devices=[]):  # the same θ0 in every process, whatever --seed is
            torch.manual_seed(TINY_INIT_SEED)
            model = auto.from_config(config, attn_implementation=attn_implementation)
    else:
        model = auto.from_pretrained(resolve_model_name(name), cache_dir=cache_dir, dtype=torch.float32,
                                     attn_implementation=attn_implementation)
    model.float()
    return model, kind


def decoder_start_id(model: nn.Module, tokenizer: Any) -> int:
    """The token a seq2seq decoder starts from (T5: the pad token)."""
    sid = getattr(model.config, "decoder_start_token_id", None)
    if sid is None:
        sid = tokenizer.pad_token_id
    return int(sid)


# ----------------------------------------------------------------------------------------------------------
# Which parameters TaLoS scores and fine-tunes (paper-notes §1.3)
# ----------------------------------------------------------------------------------------------------------
def _is_norm(m: nn.Module) -> bool:
    """Layer norms of any flavour: torch's LayerNorm/RMSNorm and transformers' own (T5LayerNorm, LlamaRMSNorm)."""
    return isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or type(m).__name__.endswith(("LayerNorm", "RMSNorm"))


def _is_linear(m: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(m, (nn.Linear, Conv1D))


def eligible_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters TaLoS may score and fine-tune.

    Every linear layer (``nn.Linear``; GPT-2's ``Conv1D``) except the LM head, and every layer norm. Token
    and position embeddings, T5's relative attention biases and the LM head stay frozen.
    """
    head = model.get_output_embeddings()
    frozen = {id(p) for p in head.parameters()} if head is not None else set()
    out, seen = [], set()
    for mname, mod in model.named_modules():
        if mod is head or not (_is_linear(mod) or _is_norm(mod)):
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in frozen or id(p) in seen:  # tied to the LM head, or already listed
                continue
            seen.add(id(p))
            out.append(f"{mname}.{pname}" if mname else pname)
    named = dict(model.named_parameters())
    return [n for n in out if n in named]  # tied duplicates are listed once by named_parameters()


def lora_targets(model: nn.Module) -> dict[str, None]:
    """LoRA targets: the query and value projections of every attention (all rows).

    T5: ``q`` / ``v`` of self- and cross-attention (peft's default for T5); Llama/Qwen/Mistral: ``q_proj`` /
    ``v_proj``; GPT-2 fuses q, k, v into one ``Conv1D`` (``c_attn``), which is adapted as a whole (peft's
    default for GPT-2), since its q and v are column blocks of a [in, 3d] weight.
    """
    from transformers.pytorch_utils import Conv1D

    out: dict[str, None] = {}
    for name, mod in model.named_modules():
        leaf = name.rpartition(".")[2]
        if isinstance(mod, nn.Linear) and leaf in ("q", "v", "q_proj", "v_proj"):
            out[f"{name}.weight"] = None
        elif isinstance(mod, Conv1D) and leaf == "c_attn":
            out[f"{name}.weight"] = None
    if not out:
        raise ValueError(f"no attention q/v projections found for LoRA in {type(model).__name__}")
    return out
