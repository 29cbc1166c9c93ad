"""Shared plumbing of the NLP scripts: model + tokenizer, prompted examples and batches, run paths, evaluator."""
from __future__ import annotations

import logging
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from talos import distributed as dist
from talos.app.flags import Config
from talos.stages import EditEvaluator
from talos.predictions import count_accuracy, predictions as all_predictions

from .args import RUNS
from .datasets import check_tasks, get_examples
from .models import decoder_start_id, eligible_parameters, load_model, load_tokenizer
from .scoring import Example, RankCollator, choice_log_likelihoods

logger = logging.getLogger("talos")
DOMAIN = "nlp"


finetune_run = RUNS.finetune  # (args, task) -> FinetuneRun
eval_run = RUNS.evaluation  # (args, protocol, extra=None) -> EvalRun
load_task_vectors = RUNS.task_vectors  # (args, tasks, mode=None) -> {task: TaskVector}


def data_kwargs(args: Config) -> dict[str, Any]:
    """Where the task readers look for data."""
    return {"data_location": args.data_location, "storycloze_dir": args.storycloze_dir, "cache_dir": args.cache_dir}


class Batches:
    """A re-iterable sequence of collated batches (calibration scores every batch in every round)."""

    def __init__(self, examples: Sequence[Example], batch_size: int, collate: RankCollator) -> None:
        self.examples, self.batch_size, self.collate = list(examples), batch_size, collate

    def __len__(self) -> int:
        return -(-len(self.examples) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(0, len(self.examples), self.batch_size):
            yield self.collate(self.examples[i : i + self.batch_size])


class NLPSetup:
    """One language model for a whole script: tokenizer, model, eligible parameters and batch builders."""

    def __init__(self, args: Config) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.tokenizer = load_tokenizer(args.tokenizer or args.model, args.cache_dir)
        self.model, self.kind = load_model(args.model, self.tokenizer, cache_dir=args.cache_dir,
                                           attn_implementation=args.attn_implementation)
        self.model.to(self.device)
        self.eligible = eligible_parameters(self.model)
        start = decoder_start_id(self.model, self.tokenizer) if self.kind == "seq2seq" else None
        self.collate = RankCollator(self.tokenizer, self.kind, args.max_seq_len, start)
        self.train_collate = RankCollator(self.tokenizer, self.kind, args.max_seq_len, start, only_label=True)
        self._examples: dict[tuple[str, str], list[Example]] = {}
        self._eval_batches: dict[tuple, list[dict[str, Any]]] = {}

    def examples(self, task: str, split: str) -> list[Example]:
        """Prompted examples of ``task``'s ``split`` ("train", "val", "test"), cached."""
        key = (task, split)
        if key not in self._examples:
            self._examples[key] = get_examples(task, split, **data_kwargs(self.args))
        return self._examples[key]

    def batches(self, task: str, split: str, batch_size: int) -> Batches:
        """Rank-classification batches (all answer choices) of a split."""
        return Batches(self.examples(task, split), batch_size, self.collate)

    def eval_batches(self, task: str, split: str) -> list[dict[str, Any]]:
        """This rank's evaluation batches of a split, tokenized once and reused for every coefficient; examples
        are sorted by prompt length (less padding; accuracy does not depend on the order)."""
        key = (task, split, dist.rank(), dist.world_size())
        if key not in self._eval_batches:
            exs = sorted(dist.shard(self.examples(task, split)), key=lambda e: len(e.prompt))
            self._eval_batches[key] = list(Batches(exs, self.args.eval_batch_size, self.collate))
        return self._eval_batches[key]

    def accuracy(self, model: nn.Module, task: str, split: str) -> float:
        """Rank-classification accuracy of ``model`` (the LM or a wrapper of it) on a split.

        Under ``torchrun`` each rank scores every world_size-th example and the counts are summed.
        """
        return count_accuracy(model, self.eval_batches(task, split), choice_log_likelihoods,
                              lambda batch: batch["labels"], device=self.device, precision=self.args.precision)

    def predictions(self, model: nn.Module, task: str, split: str) -> torch.Tensor:
        """Predicted answers [N] of ``model`` on this rank's evaluation batches of a split (prompt-length order)."""
        return all_predictions(model, self.eval_batches(task, split), choice_log_likelihoods, device=self.device,
                               precision=self.args.precision)


def make_evaluator(setup: NLPSetup, linearized: bool = False) -> EditEvaluator:
    """``evaluate(edit, task, split)``: accuracy of θ0 + edit on a task split, over the model's eligible
    parameters; with ``linearized`` through its first-order Taylor expansion around θ0."""
    return EditEvaluator(setup.model, setup.eligible, setup.accuracy, linearized=linearized)


def check_eval_data(args: Config, tasks: list[str]) -> None:
    """Fail before any model loads when a task's validation or test examples cannot be read."""
    check_tasks(tasks, splits=("val", "test"), **data_kwargs(args))
