"""Training order and augmentation that a run stopped in the middle of an epoch can resume.

A resumed run repeats the uninterrupted one exactly only if the batches after the stopping point
are the same batches, augmented the same way. Three things make that hold wherever the stop was:

* :class:`ResumableSampler` draws each epoch's order from ``(seed, epoch)`` alone (the
  ``DistributedSampler`` rule, so under DDP every rank takes its own slice of one order and
  Lightning keeps the sampler as it is) and can start its first pass part-way through;
* each drawn index travels with its own augmentation seed, ``sample_seed(seed, epoch, index)``;
  :class:`SeededSamples` opens :func:`~lightning_simo.data.transforms.augmentation_seed` around
  the read, so the augmentation of a sample depends neither on the loader worker that reads it
  nor on what that worker read before;
* :class:`ResumableLoader` is a ``DataLoader`` with a generator of its own (making an iterator
  draws worker seeds from it, not from the global generator that dropout and the checkpointed
  random states share) and with Lightning's ``state_dict`` / ``load_state_dict`` interface.

How far the interrupted epoch got is Lightning's own record (the fit loop's batch progress,
restored before the training loader is built): :func:`resume_position` reads it there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_simo.data.transforms import augmentation_seed

__all__ = [
    "ResumableLoader",
    "ResumableSampler",
    "SeededSamples",
    "resume_position",
    "sample_seed",
    "shuffle_seed",
]


def shuffle_seed() -> int:
    """The run's seed: ``seed_everything``'s (``PL_GLOBAL_SEED``), else torch's initial seed."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    return int(seed) if seed is not None else int(torch.initial_seed() % 2**63)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of sample ``index`` in ``epoch`` of a run seeded with ``seed``."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0] >> 1)


def resume_position(trainer: Any) -> tuple[int, int]:
    """``(epoch, batches already trained in it)`` of the fit ``trainer`` is about to run.

    Zero batches unless the fit was restored from a checkpoint taken inside an epoch.
    """
    loop = getattr(trainer, "fit_loop", None)
    if loop is None:
        return 0, 0
    epoch = int(loop.epoch_progress.current.processed)
    batches = int(loop.epoch_loop.batch_progress.current.processed) if loop.restarting else 0
    return epoch, batches


class ResumableSampler(DistributedSampler):
    """Shuffled indices, each with its augmentation seed, from ``(seed, epoch)`` alone.

    Args:
        dataset: what is sampled (only its length is read).
        seed: the run's seed (:func:`shuffle_seed`).
        epoch: the epoch of the first pass (Lightning sets later ones with ``set_epoch``).
        skip: samples of this rank's first pass already trained (a mid-epoch resume).
    """

    def __init__(self, dataset: Dataset, seed: int, epoch: int = 0, skip: int = 0) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(
            dataset,
            num_replicas=dist.get_world_size() if distributed else 1,
            rank=dist.get_rank() if distributed else 0,
            shuffle=True,
            seed=seed,
            drop_last=False,
        )
        self.set_epoch(epoch)
        self._skip = int(skip)

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        indices = list(super().__iter__())
        skip, self._skip = self._skip, 0  # only the first pass starts part-way
        for index in indices[skip:]:
            yield index, sample_seed(self.seed, self.epoch, index)

    def state_dict(self) -> dict[str, int]:
        return {"seed": int(self.seed), "epoch": int(self.epoch)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = int(state["seed"])  # the interrupted run's order, whatever the seed now


class SeededSamples(Dataset):
    """``dataset`` read with the augmentation seed that :class:`ResumableSampler` sends along.

    Plain integer indices (another sampler, e.g. Lightning's ``overfit_batches``) read the
    dataset as it is.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if isinstance(key, tuple):
            index, seed = key
            with augmentation_seed(seed):
                return self.dataset[index]
        return self.dataset[key]


class ResumableLoader(DataLoader):
    """A ``DataLoader`` whose state Lightning checkpoints: its sampler's seed and epoch."""

    def state_dict(self) -> dict[str, Any]:
        sampler = self.sampler
        return {"sampler": sampler.state_dict()} if isinstance(sampler, ResumableSampler) else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if isinstance(self.sampler, ResumableSampler) and "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])
