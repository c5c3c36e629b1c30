"""Early stopping on a *relative* plateau of the val loss.

Lightning's ``EarlyStopping`` counts any new minimum as progress (``min_delta`` is absolute):
under a decaying learning rate the val loss keeps creeping down by fractions of a per mille, and
a run never stops; an absolute ``min_delta`` cannot serve tasks whose losses differ tenfold
(segmentation cross-entropy ~0.5, normals ~0.2, depth ~1). Here an epoch counts as an
improvement only if it beats the best value by ``min_rel_delta`` of that value, the same rule
(``threshold_mode="rel"``) that the ``plateau`` learning-rate schedule uses to decay.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import EarlyStopping
from torch import Tensor

__all__ = ["PlateauStopping"]


class PlateauStopping(EarlyStopping):
    """``EarlyStopping`` whose improvement threshold is a fraction of the best value so far.

    Args:
        min_rel_delta: an epoch improves only if it beats the best value by this fraction of
            its magnitude (0.01: by 1%).
        *args, **kwargs: those of ``EarlyStopping`` (``monitor``, ``mode``, ``patience``, ...);
            ``min_delta`` must stay 0.
    """

    def __init__(self, *args: Any, min_rel_delta: float = 0.01, **kwargs: Any) -> None:
        if kwargs.get("min_delta", 0.0) != 0.0:
            raise ValueError(
                "PlateauStopping takes a relative threshold: set min_rel_delta, not min_delta."
            )
        if not 0.0 <= min_rel_delta < 1.0:
            raise ValueError(f"min_rel_delta must lie in [0, 1), got {min_rel_delta}.")
        super().__init__(*args, **kwargs)
        self.min_rel_delta = min_rel_delta

    def _evaluate_stopping_criteria(self, current: Tensor) -> tuple[bool, str | None]:
        # EarlyStopping compares ``current - min_delta`` with the best, min_delta signed by mode
        best = self.best_score
        if torch.isfinite(best):
            sign = 1.0 if self.monitor_op == torch.gt else -1.0
            self.min_delta = sign * self.min_rel_delta * abs(float(best))
        return super()._evaluate_stopping_criteria(current)
