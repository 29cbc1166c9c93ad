"""``python -m talos.app.report results.json [--out results.md]``: render a shared results.json as markdown."""
from __future__ import annotations

import argparse

from ..io import atomic_write_bytes, read_json
from ..report import to_markdown


def main(argv: list[str] | None = None) -> str:
    """``python -m talos.app.report results.json [--out results.md]``: render and print the tables."""
    p = argparse.ArgumentParser(description="Render a results.json as markdown tables")
    p.add_argument("results")
    p.add_argument("--out", default=None, help="also write the markdown here")
    a = p.parse_args(argv)
    md = to_markdown(read_json(a.results))
    if a.out:
        atomic_write_bytes(a.out, md.encode())
    print(md)
    return md


if __name__ == "__main__":
    main()
