"""talos.predictions: the one prediction/accuracy loop of both domains, against hand-counted cases."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from talos.predictions import count_accuracy, predictions


class Fixed(nn.Module):
    """Returns the scores stored in the batch: the test decides every prediction."""

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return scores


def _batches():
    # predictions [1, 0, 2] then [2, 2]; labels [1, 1, 2] then [0, 2]: 3 of 5 correct
    s1 = torch.tensor([[0.0, 5.0, 1.0], [3.0, 1.0, 0.0], [0.0, 0.0, 9.0]])
    s2 = torch.tensor([[0.0, 1.0, 2.0], [-1.0, -2.0, 0.5]])
    return [(s1, torch.tensor([1, 1, 2])), (s2, torch.tensor([0, 2]))]


def _scores(model, batch):
    return model(batch[0])


def test_count_accuracy_counts_correct_over_all_batches():
    acc = count_accuracy(Fixed(), _batches(), _scores, lambda b: b[1], device=torch.device("cpu"))
    assert acc == 3 / 5


def test_predictions_are_the_argmax_in_batch_order():
    got = predictions(Fixed(), _batches(), _scores, device=torch.device("cpu"))
    assert got.tolist() == [1, 0, 2, 2, 2]


def test_empty_split_and_unknown_precision():
    assert count_accuracy(Fixed(), [], _scores, lambda b: b[1], device=torch.device("cpu")) == 0.0
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        count_accuracy(Fixed(), _batches(), _scores, lambda b: b[1], device=torch.device("cpu"), precision="fp16")


def test_bf16_runs_the_scores_under_autocast():
    seen = []

    def scores(model, batch):
        seen.append(torch.is_autocast_enabled("cpu"))
        return model(batch[0])

    for precision in ("fp32", "bf16"):
        count_accuracy(Fixed(), _batches()[:1], scores, lambda b: b[1], device=torch.device("cpu"), precision=precision)
    assert seen == [False, True]
