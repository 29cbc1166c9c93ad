"""CLIP loading on today's open_clip: OpenAI tags get QuickGELU, the activation is checked, recorded and hashed."""
from __future__ import annotations

import copy
import json

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from torch import nn

from vision import args as vargs
from vision.models import CONFIG_DIR, load_clip, model_activation, resolve_activation


@pytest.fixture
def fake_openai_b32(tmp_path, monkeypatch):
    """ViT-B-32 with its real ``openai`` tag config, but a tiny architecture and a local checkpoint.

    open_clip's download is replaced by the path of a checkpoint saved from the tiny model, so the real tag
    lookup (``quick_gelu: True`` for openai) and the real loading code run offline.
    """
    import open_clip.factory as factory

    tiny = json.loads((CONFIG_DIR / "talos-tiny-vit.json").read_text())
    model = open_clip.model.CLIP(**copy.deepcopy(tiny))
    ckpt = tmp_path / "ViT-B-32-openai.pt"
    torch.save(model.state_dict(), ckpt)
    real_get = factory.get_model_config

    def get_model_config(name):
        return copy.deepcopy(tiny) if name == "ViT-B-32" else real_get(name)

    monkeypatch.setattr(factory, "get_model_config", get_model_config)
    monkeypatch.setattr(open_clip, "get_model_config", get_model_config)
    monkeypatch.setattr(factory, "download_pretrained", lambda cfg, **kw: str(ckpt))
    return ckpt


def test_openai_tag_config_says_quick_gelu():
    # The fact everything below relies on: open_clip's own tag table.
    assert open_clip.get_pretrained_cfg("ViT-B-32", "openai")["quick_gelu"] is True
    assert not open_clip.get_model_config("ViT-B-32").get("quick_gelu", False)  # the bare config says GELU


def test_openai_weights_load_with_quick_gelu(fake_openai_b32):
    model, *_ = load_clip("ViT-B-32", "openai")
    assert model_activation(model) == "quick_gelu"
    assert any(isinstance(m, QuickGELU) for m in model.visual.modules())
    assert not any(type(m) is nn.GELU for m in model.modules())


def test_plain_open_clip_call_would_lose_quick_gelu(fake_openai_b32):
    # What load_clip guards against: today's open_clip builds nn.GELU for the openai tag and only warns.
    with pytest.warns(UserWarning, match="QuickGELU mismatch"):
        model, _, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained="openai")
    assert model_activation(model) == "gelu"


def test_activation_resolution_and_mismatch(fake_openai_b32):
    assert resolve_activation("ViT-B-32", "openai") == "quick_gelu"
    assert resolve_activation("ViT-B-32", "none") == "gelu"
    assert resolve_activation("ViT-B-32-quickgelu", "none") == "quick_gelu"
    assert resolve_activation("talos-tiny-vit", str(fake_openai_b32)) == "gelu"  # a file: the config decides
    with pytest.raises(ValueError, match="allow-activation-mismatch"):
        resolve_activation("ViT-B-32", "openai", "gelu")
    assert resolve_activation("ViT-B-32", "openai", "gelu", allow_mismatch=True) == "gelu"
    model, *_ = load_clip("ViT-B-32", "openai", activation="gelu")
    assert model_activation(model) == "gelu"


def test_activation_is_validated_recorded_and_hashed(fake_openai_b32, capsys):
    base = ["--model", "ViT-B-32", "--device", "cpu", "--train-dataset", "MNIST"]
    a = vargs.parse_args(base, need_train_dataset=True)
    assert a.activation == "quick_gelu"
    assert "device: cpu (cpu), precision: fp32" in capsys.readouterr().out
    from talos.app.runs import finetune_hparams

    h = finetune_hparams(a, "MNIST")
    assert h["activation"] == "quick_gelu" and h["precision"] == "fp32"
    with pytest.raises(SystemExit):
        vargs.parse_args(base + ["--activation", "gelu"], need_train_dataset=True)
    b = vargs.parse_args(base + ["--activation", "gelu", "--allow-activation-mismatch"], need_train_dataset=True)
    assert finetune_hparams(b, "MNIST") != h
