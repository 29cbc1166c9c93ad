"""Tiny models shared by the core-library tests: every module type the Fisher fast path handles."""
from __future__ import annotations

import pytest
import torch
from torch import nn


class ToyViT(nn.Module):
    """Conv patch embedding, a direct positional parameter (fallback path), LayerNorm, batch-first MHA, MLP."""

    def __init__(self, d: int = 16, heads: int = 2, classes: int = 5) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, kernel_size=4, stride=4)
        self.pos = nn.Parameter(torch.randn(4, d) * 0.1)
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos  # (B, 4, d)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.ln2(x))
        return self.head(x.mean(1))  # (B, classes)


class ToyText(nn.Module):
    """Embedding with padding, sequence-first cross-attention with masks, RMSNorm, Linear head."""

    def __init__(self, vocab: int = 11, d: int = 8, heads: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.query = nn.Linear(d, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=False)
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.head = nn.Linear(d, classes, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.emb(tokens)  # (B, T, d)
        q = self.query(e)
        pad = tokens == 0  # (B, T) True = ignore
        seq = lambda t: t.transpose(0, 1)  # noqa: E731  (T, B, d)
        o, w = self.attn(seq(q), seq(e), seq(e), key_padding_mask=pad, need_weights=True)
        o = self.norm(seq(o))  # (B, T, d)
        return self.head(o.mean(1))


def open_clip_vit() -> nn.Module:
    """open_clip's VisionTransformer (16 px images, patch 8, width 32, 2 blocks) under a 4-class Linear ``head``,
    built after ``torch.manual_seed(0)``; skips the test without open_clip."""
    pytest.importorskip("open_clip")
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("visual", VisionTransformer(image_size=16, patch_size=8, width=32, layers=2, heads=2,
                                                 mlp_ratio=2.0, output_dim=8))
    model.add_module("head", nn.Linear(8, 4))
    return model


def vit_forward(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch)


@pytest.fixture
def toy_vit() -> ToyViT:
    torch.manual_seed(0)
    return ToyViT()


@pytest.fixture
def toy_text() -> ToyText:
    torch.manual_seed(0)
    return ToyText()


def image_batches(n_batches: int = 2, batch: int = 6, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 8, 8, generator=g) for _ in range(n_batches)]


def token_batches(n_batches: int = 2, batch: int = 5, length: int = 7, seed: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        t = torch.randint(1, 11, (batch, length), generator=g)
        t[:, -2:] = torch.where(torch.rand(batch, 2, generator=g) < 0.5, 0, t[:, -2:])  # some padding
        t[:, 3] = t[:, 1]  # repeated tokens: the embedding rule must sum rows per example before squaring
        out.append(t)
    return out
