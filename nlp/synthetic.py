"""Generated text tasks and an offline tokenizer for tests and the CPU smoke run (no downloads).

Four tasks, each in the row format of a real reader and prompted with that reader's template, each decided by
its own cue so that their task vectors differ:

* ``synth_qa``      (QASC format)       the colour of an object named in the question, out of 4 choices;
* ``synth_para``    (PAWS format)       "Yes" iff sentence 2 contains *indeed* ("No" for *never*);
* ``synth_coref``   (Winogrande format) the blank is the cat when the adjective is hungry/sleepy, else the dog;
* ``synth_control`` (RTE format)        "Yes" iff the premise says *certainly* ("No" for *perhaps*); the
  negation control.

Files: ``<location>/<task>/{train,validation[,test]}.jsonl`` (the hub split names the split rules read), plus
a word-level tokenizer trained on every prompt and answer, saved with ``save_pretrained`` so that scripts
load it by path (``--tokenizer <location>/tokenizer``). Output is identical for a given seed.

    python -m nlp.synthetic --data-location out/nlp_data

This module is a plugin: importing it registers the four tasks with ``nlp.datasets`` (which knows the paper's
tasks only); scripts load it by name, ``python nlp/finetune.py --plugins nlp.synthetic ...``.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

if __package__ in (None, ""):  # `python nlp/<script>.py`: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # (nlp/datasets.py would shadow HF `datasets`)

from nlp.datasets import TASKS, TaskSpec, register_task  # noqa: E402

__all__ = ["SYNTHETIC_TASKS", "make_synthetic_tasks", "build_tokenizer", "register", "main"]

_MARKER = ".synthetic.json"
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5

_FILLER = ("the river stone tree house road city bird window morning evening light cloud paper garden music "
           "table door summer winter north south quiet small old new far near blue sea hill lamp book").split()
_COLORS = {"apple": "red", "sky": "blue", "grass": "green", "banana": "yellow", "coal": "black", "snow": "white"}


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_FILLER) for _ in range(n))


def _qa_row(rng: random.Random, i: int) -> dict[str, Any]:
    obj = rng.choice(sorted(_COLORS))
    answer = _COLORS[obj]
    others = rng.sample(sorted(set(_COLORS.values()) - {answer}), 3)
    texts = others + [answer]
    rng.shuffle(texts)
    labels = list("ABCD")
    return {"id": f"synth_qa_{i}", "question": f"What color is the {obj}?",
            "choices": {"text": texts, "label": labels}, "answerKey": labels[texts.index(answer)],
            "fact1": f"the {obj} is {answer} near the {rng.choice(_FILLER)}.", "fact2": f"{_words(rng, 5)}.",
            "combinedfact": f"the {obj} is {answer}."}


def _para_row(rng: random.Random, i: int) -> dict[str, Any]:
    label = rng.randrange(2)
    s2 = _words(rng, 6).split()
    s2.insert(rng.randrange(len(s2) + 1), "indeed" if label else "never")
    return {"id": i, "sentence1": _words(rng, 6), "sentence2": " ".join(s2), "label": label}


def _coref_row(rng: random.Random, i: int) -> dict[str, Any]:
    adj = rng.choice(["hungry", "sleepy", "loud", "wet"])
    answer = "1" if adj in ("hungry", "sleepy") else "2"
    return {"sentence": f"By the {rng.choice(_FILLER)} the cat chased the dog because _ was {adj}.",
            "option1": "cat", "option2": "dog", "answer": answer}


def _control_row(rng: random.Random, i: int) -> dict[str, Any]:
    label = rng.randrange(2)  # RTE: 0 = entailment ("Yes"), 1 = not entailment ("No")
    premise = f"{_words(rng, 4)} is {'certainly' if label == 0 else 'perhaps'} {_words(rng, 3)}."
    return {"premise": premise, "hypothesis": f"{_words(rng, 4)}.", "idx": i, "label": label}


#: task -> (row generator, hub splits written and their sizes)
SYNTHETIC_TASKS: dict[str, Callable[[random.Random, int], dict[str, Any]]] = {
    "synth_qa": _qa_row, "synth_para": _para_row, "synth_coref": _coref_row, "synth_control": _control_row,
}


def _choice_label(row: dict[str, Any]) -> int:
    """QASC's label: the index of ``answerKey`` among the choice labels."""
    return list(row["choices"]["label"]).index(row["answerKey"])


def register() -> None:
    """Register the generated tasks with ``nlp.datasets`` (idempotent; runs when this module is imported).

    Rows are in the real readers' formats and prompted with the real templates, so the tasks exercise the same
    code paths as the paper's tasks.
    """
    hint = "python -m nlp.synthetic --data-location {data_location}"
    specs = [TaskSpec("synth_qa", "qasc", _choice_label, "val32", prepare_hint=hint),
             TaskSpec("synth_para", "paws", lambda r: int(r["label"]), "own", prepare_hint=hint,
                      int_fields=("id", "label")),
             TaskSpec("synth_coref", "winogrande", lambda r: int(r["answer"]) - 1, "val32", prepare_hint=hint),
             TaskSpec("synth_control", "rte", lambda r: int(r["label"]), "val32", prepare_hint=hint,
                      int_fields=("idx", "label"))]
    for spec in specs:
        if spec.name not in TASKS:
            register_task(spec)


register()


def _split_sizes(task: str, n_train: int, n_heldout: int) -> dict[str, int]:
    if TASKS.get(task).split_rule == "own":  # own validation and test splits
        return {"train": n_train, "validation": n_heldout // 2, "test": n_heldout // 2}
    return {"train": n_train, "validation": n_heldout}  # val = first 32 of shuffled validation, test = rest


def _prepare_folder(folder: Path) -> None:
    if folder.exists():
        if not (folder / _MARKER).is_file():
            raise FileExistsError(f"{folder} exists and was not written by nlp.synthetic; refusing to overwrite it")
        shutil.rmtree(folder)


def make_synthetic_tasks(location: str | Path, names: Sequence[str] = tuple(SYNTHETIC_TASKS), n_train: int = 200,
                         n_heldout: int = 96, seed: int = 0) -> dict[str, Path]:
    """Write the synthetic tasks ``names`` as JSONL under ``location``; returns task -> folder."""
    root = Path(location).expanduser()
    out = {}
    for name in names:
        if name not in SYNTHETIC_TASKS:
            raise ValueError(f"unknown synthetic task {name!r}; valid: {', '.join(SYNTHETIC_TASKS)}")
        folder = root / name
        _prepare_folder(folder)
        folder.mkdir(parents=True)
        sizes = _split_sizes(name, n_train, n_heldout)
        for split, n in sizes.items():
            # crc32 rather than hash(): str hashes are salted per process
            rng = random.Random(seed * 1_000_003 + zlib.crc32(f"{name}/{split}".encode()))
            with (folder / f"{split}.jsonl").open("w") as f:
                for i in range(n):
                    f.write(json.dumps(SYNTHETIC_TASKS[name](rng, i)) + "\n")
        (folder / _MARKER).write_text(json.dumps({"task": name, "sizes": sizes, "seed": seed}) + "\n")
        out[name] = folder
    return out


def corpus(location: str | Path, names: Sequence[str] = tuple(SYNTHETIC_TASKS)) -> list[str]:
    """Every prompt and answer choice of the synthetic tasks under ``location`` (the tokenizer's training text)."""
    from .datasets import SPLITS, clear_cache, get_examples

    clear_cache()
    texts = []
    for name in names:
        for split in SPLITS:
            for ex in get_examples(name, split, data_location=str(location)):
                texts.append(ex.prompt)
                texts.extend(ex.choices)
    return texts


def build_tokenizer(texts: Sequence[str], out_dir: str | Path) -> Any:
    """Train a word-level tokenizer on ``texts`` and save it as a ``PreTrainedTokenizerFast`` in ``out_dir``.

    Pre-tokenisation splits on whitespace and punctuation; ``<pad>`` = 0, ``</s>`` = 1 (appended to every
    encoded text, as T5's tokenizer does) and ``<unk>`` = 2.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(list(texts), trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS)))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=1024)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    """Write the synthetic tasks and their tokenizer (default ``<location>/tokenizer``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-location", required=True)
    p.add_argument("--tokenizer-dir", default=None)
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--n-heldout", type=int, default=96, help="rows of the held-out hub split(s) per task")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = make_synthetic_tasks(a.data_location, n_train=a.n_train, n_heldout=a.n_heldout, seed=a.seed)
    tok_dir = Path(a.tokenizer_dir or Path(a.data_location) / "tokenizer")
    tok = build_tokenizer(corpus(a.data_location), tok_dir)
    print(f"wrote {', '.join(out)} under {a.data_location}; tokenizer ({len(tok)} tokens) in {tok_dir}")
    return out


if __name__ == "__main__":
    main()
