"""The learning-rate schedules of every module: one cycle with a warm-up (the SIMO recipe), or a
decay on a plateau of the val loss (for runs that stop on a plateau, where no fixed length exists).

One place, because ``OneCycleLR`` divides by the length of each phase: a warm-up that rounds to
one step, or a run of very few steps (small labelled budgets), would divide by zero; and because
the schedule's length must be counted without disturbing a resumed run (:func:`stepping_batches`).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "MIN_ONE_CYCLE_STEPS",
    "PLATEAU_MONITOR",
    "SCHEDULES",
    "on_plateau",
    "one_cycle",
    "stepping_batches",
]

SCHEDULES = ("onecycle", "constant", "plateau")
"""``onecycle``: the SIMO recipe over the fit's length; ``constant``; ``plateau``: the learning rate
falls by ``plateau_factor`` after every validation without a new minimum of ``PLATEAU_MONITOR``."""

PLATEAU_MONITOR = "val/loss"

MIN_ONE_CYCLE_STEPS = 4
"""Shorter runs keep a constant learning rate (there is no room for warm-up and decay)."""


def stepping_batches(trainer: Any) -> int:
    """Lightning's count of the fit's optimizer steps, without keeping the loader built for it.

    To count, Lightning builds the training loader and starts its iterator (loader workers
    prefetch at once). Asked from ``configure_optimizers``, that happens before a resumed run's
    loop state is restored, and the fit would then train on that iterator: the interrupted epoch
    would start from its first batch instead of where it stopped. Dropping what was built for
    the count makes the fit build its loader after the restore, as when nothing asks early.
    """
    loop = trainer.fit_loop
    built_here = loop._combined_loader is None
    total = int(trainer.estimated_stepping_batches)
    if built_here and loop._combined_loader is not None:
        if loop._data_fetcher is not None:
            loop._data_fetcher.teardown()  # stops the workers it started
            loop._data_fetcher = None
        loop._combined_loader = None
    return total


def one_cycle(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float
) -> dict[str, Any]:
    """A Lightning ``lr_scheduler`` config: one cycle over ``total_steps`` optimizer steps.

    The warm-up spans at least two steps and at most half the run, so both phases are long
    enough for ``OneCycleLR``; each parameter group keeps its own peak learning rate.
    """
    peaks = [group["lr"] for group in optimizer.param_groups]
    if total_steps < MIN_ONE_CYCLE_STEPS:
        scheduler: Any = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    else:
        pct = min(max(warmup_fraction, 2.0 / total_steps), 0.5)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=peaks,
            total_steps=total_steps,
            pct_start=pct,
            anneal_strategy="cos",
            cycle_momentum=False,
        )
    return {"scheduler": scheduler, "interval": "step"}


def on_plateau(optimizer: torch.optim.Optimizer, factor: float, threshold: float) -> dict[str, Any]:
    """A Lightning ``lr_scheduler`` config: every learning rate times ``factor`` after each epoch
    whose val loss does not beat the best by ``threshold`` of it (relative).

    Why patience 0: with :class:`~lightning_simo.callbacks.plateau.PlateauStopping` (patience p,
    the same relative threshold) the run then tries p smaller learning rates before it stops, so
    it ends where lowering the rate no longer helps (a plateau), not where a constant rate's
    epoch-to-epoch noise happened to miss a minimum p times.
    """
    if not 0.0 < factor < 1.0:
        raise ValueError(f"plateau_factor must lie in (0, 1), got {factor}.")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"plateau_threshold must lie in [0, 1), got {threshold}.")
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=factor, patience=0, threshold=threshold, threshold_mode="rel"
    )
    return {"scheduler": scheduler, "interval": "epoch", "monitor": PLATEAU_MONITOR}
