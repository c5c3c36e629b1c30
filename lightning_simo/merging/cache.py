"""One index-keyed cache of per-sample results of frozen models (encoder features, teacher targets).

Re-alignment runs frozen networks on the same training images every epoch: head re-alignment the
merged encoder, tinting and surgery the single-task teachers. Their outputs for a sample never
change, so they are computed once per sample index and served from memory afterwards.

Storage is one preallocated buffer per output part (``capacity x ...``, grown by doubling), so a
cached batch is one ``index_select`` per part, not a stack of per-sample tensors. The cache is only
valid when a sample index always gives the same image; one fingerprint rule (:func:`fingerprint`)
is checked on every hit, and a changed image raises :class:`StaleCacheError` naming the sample and
the fix, instead of training on another image's outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["SampleCache", "StaleCacheError", "fingerprint"]

# the same image gives the same float64 signature up to reduction order on a device
_RTOL = 1e-6
_ATOL = 1e-6


class StaleCacheError(ValueError):
    """A cached sample index now holds another image (augmented or reordered training data)."""


def fingerprint(images: Tensor) -> Tensor:
    """``B x 4`` float64 signature per image: its height, its sum, and its sums weighted by column
    and by row position. Crops and rescales change the size or the sum, colour changes the sum,
    flips the weighted sums."""
    x = images.detach().double().sum(dim=1)  # B x H x W
    rows = torch.linspace(0.0, 1.0, x.shape[-2], dtype=x.dtype, device=x.device)[:, None]
    cols = torch.linspace(0.0, 1.0, x.shape[-1], dtype=x.dtype, device=x.device)[None, :]
    height = torch.full_like(x[:, 0, 0], float(x.shape[-2]))
    sums = [x.sum((1, 2)), (x * cols).sum((1, 2)), (x * rows).sum((1, 2))]
    return torch.stack([height, *sums], dim=1)


class SampleCache:
    """Per-sample outputs of a frozen computation, keyed by the dataset index of the sample.

    Args:
        what: what is cached, for messages ("encoder features").
        fix: the setting that turns the cache off, for messages.
        device: where the outputs are kept (``None``: where they were computed; ``"cpu"`` keeps
            large caches off the accelerator).
    """

    def __init__(self, what: str, fix: str, device: torch.device | str | None = None) -> None:
        self.what = what
        self.fix = fix
        self.device = None if device is None else torch.device(device)
        self._slots: dict[int, int] = {}
        self._buffers: list[Tensor] = []
        self._prints = torch.empty(0, 4, dtype=torch.float64)
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._slots)

    def indices(self) -> list[int]:
        """The cached sample indices, sorted."""
        return sorted(self._slots)

    def entry(self, index: int) -> list[Tensor]:
        """The cached outputs of one sample (views into the buffers)."""
        slot = self._slots[index]
        return [buffer[slot] for buffer in self._buffers]

    def get(
        self, indices: Tensor, images: Tensor, compute: Callable[[Tensor], Sequence[Tensor]]
    ) -> list[Tensor]:
        """The outputs of every sample of the batch, on ``images``' device.

        ``compute(images[missing])`` runs on the samples not cached yet and returns tensors whose
        first dimension is the batch (the same number and shapes on every call).
        """
        keys = [int(i) for i in indices.tolist()]
        prints = fingerprint(images).cpu()
        hit = [j for j, key in enumerate(keys) if key in self._slots]
        if hit:
            self._check_unchanged([keys[j] for j in hit], prints[hit])
        missing = [j for j, key in enumerate(keys) if key not in self._slots]
        if missing:
            fresh = [t.detach() for t in compute(images[missing])]
            self._add([keys[j] for j in missing], prints[missing], fresh)
        self.misses += len(missing)
        self.hits += len(hit)
        slots = torch.tensor([self._slots[key] for key in keys], dtype=torch.long)
        return [
            buffer.index_select(0, slots.to(buffer.device)).to(images.device, non_blocking=True)
            for buffer in self._buffers
        ]

    def _add(self, keys: list[int], prints: Tensor, outputs: list[Tensor]) -> None:
        new = list(dict.fromkeys(k for k in keys if k not in self._slots))
        start = len(self._slots)
        needed = start + len(new)
        if not self._buffers:
            self._buffers = [
                torch.empty(
                    (max(needed, 1), *t.shape[1:]), dtype=t.dtype, device=self.device or t.device
                )
                for t in outputs
            ]
        elif needed > self._buffers[0].shape[0]:
            capacity = max(needed, 2 * self._buffers[0].shape[0])
            self._buffers = [_grown(b, capacity) for b in self._buffers]
        if needed > self._prints.shape[0]:
            self._prints = _grown(self._prints, max(needed, 2 * self._prints.shape[0]))
        for offset, key in enumerate(new):
            self._slots[key] = start + offset
        slots = torch.tensor([self._slots[k] for k in keys], dtype=torch.long)
        self._prints[slots] = prints
        for buffer, value in zip(self._buffers, outputs, strict=True):
            buffer[slots.to(buffer.device)] = value.to(buffer.device, buffer.dtype)

    def _check_unchanged(self, keys: list[int], prints: Tensor) -> None:
        stored = self._prints[torch.tensor([self._slots[k] for k in keys], dtype=torch.long)]
        close = torch.isclose(stored, prints, rtol=_RTOL, atol=_ATOL).all(dim=1)
        if bool(close.all()):
            return
        changed = keys[int((~close).nonzero()[0, 0])]
        raise StaleCacheError(
            f"Cached {self.what} are stale: training sample {changed} is not the image they were "
            "computed on (is the training data augmented?). Caching needs the same image for the "
            f"same index in every epoch: set `augment: false` on the datamodule, or {self.fix}."
        )


def _grown(buffer: Tensor, capacity: int) -> Tensor:
    grown = torch.empty((capacity, *buffer.shape[1:]), dtype=buffer.dtype, device=buffer.device)
    grown[: buffer.shape[0]] = buffer
    return grown
