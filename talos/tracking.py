"""Experiment tracking: a thin wandb wrapper that is a no-op unless enabled, and works offline without login."""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence


class Tracker:
    """Logs metrics to wandb when ``enabled``; otherwise every call does nothing (wandb is not imported).

    ``WANDB_MODE=offline`` (or ``mode="offline"``) writes runs locally with no login or network; sync later
    with ``wandb sync``.
    """

    def __init__(
        self,
        enabled: bool = False,
        *,
        project: str = "talos",
        entity: str | None = None,
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        group: str | None = None,
        dir: str | os.PathLike | None = None,
        mode: str | None = None,
    ) -> None:
        self.enabled = enabled
        self.run = None
        if not enabled:
            return
        import wandb

        kwargs: dict[str, Any] = dict(project=project, entity=entity, name=name, group=group,
                                      config=dict(config or {}), reinit=True)
        if dir is not None:
            os.makedirs(dir, exist_ok=True)
            kwargs["dir"] = str(dir)
        mode = mode or os.environ.get("WANDB_MODE")
        if mode:
            kwargs["mode"] = mode
        self.run = wandb.init(**kwargs)

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log scalar metrics (optionally at a step)."""
        if self.run is not None:
            self.run.log(dict(metrics), step=step)

    def summary(self, metrics: Mapping[str, Any]) -> None:
        """Set final values in the run summary (tables of results)."""
        if self.run is not None:
            for k, v in metrics.items():
                self.run.summary[k] = v

    def table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Log a table (a ``wandb.Table``), e.g. per-task results of an evaluation protocol."""
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def finish(self) -> None:
        """Close the run (flushes offline files)."""
        if self.run is not None:
            self.run.finish()
            self.run = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()
