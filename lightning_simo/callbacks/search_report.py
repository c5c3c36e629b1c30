"""The α search and the merge's α, sent to every logger in forms a person can read.

Plain functions of plain values (the grid, the scores, the chosen α), so whatever orchestrates
the merge only calls them:

- ``merge/search_score`` as a scalar series indexed by α: its step is ``round(100 α)``
  (α = 0.5 is step 50), so every logger's x axis reads α in hundredths, not the grid position;
- one figure, score against α with the chosen α marked, to every logger that takes images
  (TensorBoard, MLflow, W&B), and as ``alpha_search.png`` in a CSV logger's folder;
- ``merge/alpha`` (the α the weights were merged with) and other merge facts at step 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from matplotlib.figure import Figure

from lightning_simo.callbacks.visualize import log_figure

__all__ = [
    "ALPHA_STEPS",
    "alpha_search_figure",
    "log_alpha_search",
    "log_merge_facts",
    "log_metrics_everywhere",
    "report_restored_alpha",
]

ALPHA_STEPS = 100
"""Steps per unit of α in the ``merge/search_*`` series."""


def alpha_search_figure(
    scores: Mapping[float, float], chosen: float | None, method: str = "", split: str = "val"
) -> Figure:
    """Score against α, the chosen α marked by a vertical line and a dot."""
    alphas = sorted(scores)
    fig = Figure(figsize=(4.5, 3.2))
    ax = fig.subplots()
    ax.plot(alphas, [scores[a] for a in alphas], marker="o", lw=1.5)
    if chosen is not None and chosen in scores:
        ax.axvline(chosen, color="tab:red", ls="--", lw=1)
        ax.plot([chosen], [scores[chosen]], "o", color="tab:red", ms=8, label=f"α = {chosen:g}")
        ax.legend(fontsize=8)
    ax.set_xlabel("α")
    ax.set_ylabel(f"mean normalised performance ({split})")
    ax.set_title(f"{method} α search".strip(), fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def log_metrics_everywhere(trainer: L.Trainer, metrics: Mapping[str, float], step: int) -> None:
    """``log_metrics`` on every logger of the trainer (rank 0 logs; others are no-ops)."""
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)


def log_alpha_search(
    trainer: L.Trainer,
    scores: Mapping[float, float],
    chosen: float,
    method: str = "",
    split: str = "val",
) -> None:
    """The whole α search to every logger: the series indexed by α and the figure."""
    if not trainer.loggers or not trainer.is_global_zero:
        return
    for alpha in sorted(scores):
        log_metrics_everywhere(
            trainer,
            {"merge/search_score": float(scores[alpha]), "merge/search_alpha": alpha},
            step=round(alpha * ALPHA_STEPS),
        )
    fig = alpha_search_figure(scores, chosen, method, split)
    log_figure(trainer, "merge/alpha_search", fig, step=0)
    from lightning.pytorch.loggers import CSVLogger

    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger) and logger.log_dir:
            Path(logger.log_dir).mkdir(parents=True, exist_ok=True)
            fig.savefig(Path(logger.log_dir) / "alpha_search.png", dpi=120)


def log_merge_facts(trainer: L.Trainer, facts: Mapping[str, Any]) -> None:
    """Merge facts (``merge/alpha``, ``merge/trainable_params``, ...) at step 0 everywhere."""
    if not trainer.loggers:
        return
    numbers = {k: float(v) for k, v in facts.items() if isinstance(v, (int, float))}
    log_metrics_everywhere(trainer, numbers, step=0)


def report_restored_alpha(trainer: L.Trainer, method: str, alpha: float | None) -> None:
    """Say and log the α a restored checkpoint was merged with (known only once Lightning has
    restored the callback state, after ``setup``)."""
    from lightning.pytorch.utilities import rank_zero_info

    shown = "none (the method has no α)" if alpha is None else f"{alpha:g}"
    rank_zero_info(f"[merge] restored {method} merge from the checkpoint: α = {shown}")
    if alpha is not None:
        log_merge_facts(trainer, {"merge/alpha": alpha})
