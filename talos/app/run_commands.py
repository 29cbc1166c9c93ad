"""Run a file of script commands in one Python process: ``python -m talos.app.run_commands FILE``.

Each line is ``<domain>/<script>.py ARGS...`` as a shell would split it (``python -m talos.app.sweep --dry-run``
prints such lines, with ``python`` in front); the line's module ``main(argv)`` is called with ARGS, which is
exactly what ``python <domain>/<script>.py ARGS`` runs (:func:`talos.app.sweep.run_in_process`).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import Sequence

from .sweep import Command, run_in_process


def run_line(line: str) -> None:
    """Run one command line in-process."""
    script, *argv = shlex.split(line)
    if not script.endswith(".py"):
        raise ValueError(f"expected '<domain>/<script>.py ARGS', got {line.strip()!r}")
    cmd = Command(script, script, tuple(argv))
    print("+", cmd.shell(), flush=True)
    run_in_process(cmd)


def main(argv: Sequence[str] | None = None) -> None:
    """Run every non-empty line of the file, in order; the first failure stops the run (non-zero exit)."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("commands", help="file with one '<domain>/<script>.py ARGS' command per line")
    a = p.parse_args(argv)
    with open(a.commands) as f:
        lines = [ln for ln in f if ln.strip()]
    for line in lines:
        run_line(line)


if __name__ == "__main__":
    sys.exit(main())
