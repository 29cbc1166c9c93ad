"""Shared plumbing of the vision scripts: model + heads, data loaders, run paths, and the evaluator."""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from talos import distributed as dist
from talos.io import check_artifact, load_tensors, record_artifact, save_tensors
from talos.app.flags import Config
from talos.paths import head_path
from talos.stages import EditEvaluator
from talos.predictions import count_accuracy, predictions as all_predictions

from .args import RUNS
from .datasets import DATASETS, base_name, check_datasets, get_dataset
from .models import ImageClassifier, head_key, load_clip, split_parameters, zeroshot_head

logger = logging.getLogger("talos")
DOMAIN = "vision"


finetune_run = RUNS.finetune  # (args, task) -> FinetuneRun
eval_run = RUNS.evaluation  # (args, protocol, extra=None) -> EvalRun
load_task_vectors = RUNS.task_vectors  # (args, tasks, mode=None) -> {task: TaskVector}


class VisionSetup:
    """One CLIP model for a whole script: its image classifier, cached zero-shot heads and loaders."""

    def __init__(self, args: Config) -> None:
        self.args = args
        self.device = torch.device(args.device)
        clip, self.train_preprocess, self.val_preprocess, self.tokenizer = load_clip(
            args.model, args.pretrained, args.openclip_cachedir, device="cpu",
            activation=args.activation)
        self._clip = clip
        self._heads: dict[str, Tensor] = {}
        self._eval_cache: dict[tuple[str, str], torch.utils.data.TensorDataset] = {}
        self._eval_cache_bytes = 0
        if args.grad_checkpointing:  # non-reentrant: Fisher scores keep their fast path
            clip.visual.set_grad_checkpointing(True)
        self.classifier = ImageClassifier(clip.visual, torch.zeros(1, 1)).to(self.device)
        self.eligible, self.dense = split_parameters(self.classifier, args.freeze_embeddings)

    def head(self, task: str) -> Tensor:
        """Zero-shot head [C, D] of ``task`` (base dataset), cached on disk as safetensors."""
        name = base_name(task)
        if name not in self._heads:
            spec = DATASETS.get(name)
            classnames, templates = spec.classnames(self.args.data_location), spec.templates
            path = head_path(self.args.save, DOMAIN, self.args.model, name, head_hparams(self.args, classnames, templates))
            if path.exists() and check_artifact(path) is None:
                w = load_tensors(path)["head"]
            else:
                w = zeroshot_head(self._clip.to(self.device), self.tokenizer, classnames, templates, str(self.device))
                self._clip.to("cpu")
                if dist.is_main():
                    save_tensors(path, {"head": w})
                    record_artifact(path)
            self._heads[name] = w
        return self._heads[name]

    def use_task(self, task: str) -> ImageClassifier:
        """The classifier with ``task``'s head installed."""
        self.classifier.set_head(self.head(task).to(self.device))
        return self.classifier

    def dataset(self, task: str, split: str, train_transform: bool = False):
        """``split`` 'train'/'val'/'test' of ``task``: val = the held-out <Task>Val split."""
        tf = self.train_preprocess if train_transform else self.val_preprocess
        if split == "val":
            return get_dataset(base_name(task) + "Val", "test", tf, self.args.data_location)
        return get_dataset(base_name(task), split, tf, self.args.data_location)

    def eval_data(self, task: str, split: str) -> torch.utils.data.Dataset:
        """``split`` of ``task`` with the evaluation preprocessing, held in memory as one tensor when it fits in
        what is left of ``--eval-cache-mb``: the protocols read each split once per coefficient, and decoding
        and resizing the images again each time costs as much as the forward pass of a small model."""
        key = (base_name(task), split)
        if key in self._eval_cache:
            return self._eval_cache[key]
        ds = self.dataset(task, split)
        room = self.args.eval_cache_mb * 2**20 - self._eval_cache_bytes
        if len(ds) == 0 or room <= 0:
            return ds
        x0 = ds[0][0]
        need = len(ds) * x0.numel() * x0.element_size()
        if need > room:
            return ds
        xs, ys = [], []
        for x, y in self.loader(ds, self.args.eval_batch_size):
            xs.append(x)
            ys.append(torch.as_tensor(y))
        cached = torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys))
        self._eval_cache[key] = cached
        self._eval_cache_bytes += need
        return cached

    def loader(self, dataset, batch_size: int, shuffle: bool = False) -> torch.utils.data.DataLoader:
        base = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
        in_memory = isinstance(base, torch.utils.data.TensorDataset)  # workers would only copy the tensors
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                                           num_workers=0 if in_memory else self.args.num_workers,
                                           pin_memory=self.device.type == "cuda")

    def eval_batches(self, task: str, split: str) -> torch.utils.data.DataLoader:
        """This rank's (images, labels) evaluation batches of a split: every world_size-th example under
        ``torchrun``, the whole split otherwise."""
        ds = self.eval_data(task, split)
        if dist.is_distributed():
            ds = torch.utils.data.Subset(ds, dist.shard(range(len(ds))))
        return self.loader(ds, self.args.eval_batch_size)

    def scores(self, model: torch.nn.Module, batch: Any) -> Tensor:
        """Class logits [B, C] of an (images, labels) batch."""
        return model(batch[0].to(self.device, non_blocking=True))

    def accuracy(self, model: torch.nn.Module, task: str, split: str) -> float:
        """Accuracy of ``model`` (the classifier or its linearized wrapper) on a split, counts summed over ranks.
        The task's zero-shot head is a buffer of the classifier: installing it reaches a wrapper too."""
        self.use_task(task)
        return count_accuracy(model, self.eval_batches(task, split), self.scores, lambda batch: batch[1],
                              device=self.device, precision=self.args.precision)

    def predictions(self, model: torch.nn.Module, task: str, split: str) -> Tensor:
        """Predicted classes [N] of ``model`` on the whole split (every example, in dataset order)."""
        self.use_task(task)
        batches = self.loader(self.eval_data(task, split), self.args.eval_batch_size)
        return all_predictions(model, batches, self.scores, device=self.device, precision=self.args.precision)

    def trainable_state(self) -> dict[str, Tensor]:
        """Current values of every tensor a fine-tuning run may change (eligible + dense), on CPU."""
        named = dict(self.classifier.named_parameters())
        return {n: named[n].detach().cpu().clone() for n in self.eligible + self.dense}


def head_hparams(args: Config, classnames: Any, templates: Any) -> dict[str, Any]:
    """The zero-shot head cache key: the weights as the run hash names them (a file by content), the class
    prompts, and the seed when the weights are a random initialisation (``--pretrained none``)."""
    h = {"pretrained": args.pretrained_id or args.pretrained, "activation": args.activation, "classes": head_key(classnames, templates)}
    if args.pretrained in (None, "", "none"):
        h["seed"] = args.seed
    return h


def logits_forward(model: torch.nn.Module, batch: Any) -> Tensor:
    """Per-example class scores of an (images, labels) batch: the calibration forward."""
    images = batch[0].to(next(model.parameters()).device, non_blocking=True)
    return model(images)


def make_evaluator(setup: VisionSetup, linearized: bool = False) -> EditEvaluator:
    """``evaluate(edit, task, split)``: accuracy of θ0 + edit on a task split, over the classifier's edited
    parameters (eligible + dense); with ``linearized`` through its first-order Taylor expansion around θ0."""
    return EditEvaluator(setup.classifier, setup.eligible + setup.dense, setup.accuracy, linearized=linearized)


def check_eval_data(args: Config, tasks: list[str]) -> None:
    """Fail before any model loads when a task's image folders are missing."""
    check_datasets(tasks, args.data_location)
