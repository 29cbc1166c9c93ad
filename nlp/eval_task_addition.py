"""NLP task addition (see nlp/evaluate.py for the protocol and flags).

    python nlp/eval_task_addition.py --model t5-base --finetuning-mode talos --save runs
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # `python nlp/<script>.py`: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # (nlp/datasets.py would shadow HF `datasets`)

from nlp.evaluate import main as _main


def main(argv: Sequence[str] | None = None) -> dict:
    """Entry point; `argv` defaults to the command line."""
    return _main("addition", argv)


if __name__ == "__main__":
    main()
