"""NonFiniteGuard: stop, or skip the batch, as soon as a task loss is NaN or infinite.

One non-finite loss spreads through the optimizer into every weight it reaches; the checkpoints
saved afterwards, an α search or a re-alignment built on them are then silently worthless. The
check runs inside the training step, on the per-task losses and before the backward pass (only
the module sees them there), so no optimizer step ever uses a non-finite loss:

* ``stop`` raises :class:`NonFiniteLossError` naming the task, the global step and the value;
  training ends, and no checkpoint is written after the bad step (``ModelCheckpoint`` would
  otherwise store a NaN monitor value as ``+inf`` and may still keep that model as its only
  "best" one);
* ``skip`` makes the module return ``None`` from ``training_step``, Lightning's way of skipping a
  batch under automatic optimisation (no backward, no weight update), and warns once per batch.
  The batch's forward pass has run, so BatchNorm running statistics did see it: a NaN coming
  from the inputs (not only from a loss) can still reach them, which ``stop`` reports instead.

The module asks the guard through its ``nonfinite_guard`` attribute, which this callback sets in
``setup`` (``SIMOModule`` and its subclasses carry it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

__all__ = ["GUARD_ACTIONS", "NonFiniteGuard", "NonFiniteLossError", "first_nonfinite"]

GUARD_ACTIONS = ("stop", "skip")


class NonFiniteLossError(FloatingPointError):
    """A task loss was NaN or infinite while ``NonFiniteGuard(action="stop")`` was active."""


def first_nonfinite(losses: Mapping[str, Tensor]) -> tuple[str, float] | None:
    """``(task, value)`` of the first non-finite loss, or ``None`` when all are finite.

    All losses are tested in one reduction, so the common all-finite case costs a single
    device-to-host synchronisation per step.
    """
    if not losses:
        return None
    values = torch.stack([loss.detach().float().reshape(()) for loss in losses.values()])
    if bool(torch.isfinite(values).all()):
        return None
    for task, value in zip(losses, values.tolist(), strict=True):
        if not math.isfinite(value):
            return task, value
    return None  # unreachable: some value was non-finite


class NonFiniteGuard(L.Callback):
    """Stop training (``"stop"``) or skip the batch (``"skip"``) on a non-finite task loss.

    Args:
        action: ``"stop"`` raises :class:`NonFiniteLossError`; ``"skip"`` drops the batch and
            counts it in ``skipped`` (saved in checkpoints, so a resumed run keeps counting).
    """

    def __init__(self, action: str = "stop") -> None:
        if action not in GUARD_ACTIONS:
            raise ValueError(
                f"NonFiniteGuard action must be one of {GUARD_ACTIONS}, got {action!r}."
            )
        self.action = action
        self.skipped = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "nonfinite_guard"):
            raise ValueError(
                f"NonFiniteGuard needs a module that screens its task losses (SIMOModule and its "
                f"subclasses); {type(pl_module).__name__} does not. Remove the callback."
            )
        pl_module.nonfinite_guard = self

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if getattr(pl_module, "nonfinite_guard", None) is self:
            pl_module.nonfinite_guard = None

    def allows(self, losses: Mapping[str, Tensor], step: int) -> bool:
        """Whether the batch may train; ``False`` means skip it. Raises in ``stop`` mode."""
        bad = first_nonfinite(losses)
        if bad is None:
            return True
        task, value = bad
        where = f"task {task!r} has a non-finite training loss ({value}) at global step {step}"
        if self.action == "stop":
            raise NonFiniteLossError(
                f"{where}; training stopped before this step updated any weight. Lower the "
                "learning rate, check this task's data, or use NonFiniteGuard(action='skip')."
            )
        self.skipped += 1
        rank_zero_warn(f"NonFiniteGuard: {where}; batch skipped ({self.skipped} so far).")
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
