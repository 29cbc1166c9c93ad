"""NLP task negation (see nlp/evaluate.py for the protocol and flags).

    python nlp/eval_task_negation.py --model t5-base --finetuning-mode talos --save runs
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # `python nlp/<script>.py` from the repository root
    # the script's folder must not be on the path: nlp/datasets.py would shadow Hugging Face `datasets`
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from nlp.evaluate import main as _main


def main(argv: Sequence[str] | None = None) -> dict:
    """Entry point; `argv` defaults to the command line."""
    return _main("negation", argv)


if __name__ == "__main__":
    main()
