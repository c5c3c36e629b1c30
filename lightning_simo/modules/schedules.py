"""The learning-rate schedule every module uses: one cycle with a warm-up (the SIMO recipe).

One place, because ``OneCycleLR`` divides by the length of each phase: a warm-up that rounds to
one step, or a run of very few steps (small labelled budgets), would divide by zero; and because
the schedule's length must be counted without disturbing a resumed run (:func:`stepping_batches`).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["MIN_ONE_CYCLE_STEPS", "one_cycle", "stepping_batches"]

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
