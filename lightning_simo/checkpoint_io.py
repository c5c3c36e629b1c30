"""AtomicCheckpointIO: Lightning's checkpoint I/O, made atomic and safe.

Kept apart from :mod:`lightning_simo.checkpoints` so that the readers and writers there (and
with them merging, lazy merging and ``lightning_simo merge``) import without Lightning, which
costs about 0.3 GB of resident memory a large merge has better uses for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_simo.checkpoints import read_checkpoint, save_state_dict_atomic

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Every save goes to a temporary file renamed over the destination once complete.

    Lightning's own writer truncates the destination before writing it, so a full disk or a
    file-size limit while saving ``last.ckpt`` destroys the previous, valid one. Here a failure
    is one :class:`~lightning_simo.io.OutputWriteError` and the old file stays; every load goes
    through the suite's reader (``weights_only``, one-line diagnosis of bad files).
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        save_state_dict_atomic(checkpoint, Path(path))

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return read_checkpoint(path)
