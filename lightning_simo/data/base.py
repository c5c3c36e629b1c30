"""What every dense multi-task datamodule shares: task selection, splits and loader settings.

A concrete datamodule declares which tasks its dataset carries (``dataset_tasks``) and builds one
``torch.utils.data.Dataset`` per split (``make_dataset``). Samples are dicts of tensors keyed by
``"image"`` (``3 x H x W`` float in [0, 1]), the task names (conventions in
:mod:`lightning_simo.tasks`) and ``"index"`` (the sample's position in its split, used to cache
encoder features).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_simo.data.sampling import (
    ResumableLoader,
    ResumableSampler,
    SeededSamples,
    resume_position,
    shuffle_seed,
)
from lightning_simo.tasks import available_tasks

__all__ = ["DenseDataModule", "EVAL_SPLITS", "SPLITS", "select_budget"]

SPLITS = ("train", "val", "test")
"""Every split a datamodule serves."""
EVAL_SPLITS = SPLITS[1:]
"""The splits that are scored (each keeps its own metric state in a module)."""


def select_budget(dataset: Dataset, budget: float | int | None, seed: int = 0) -> Dataset:
    """A seeded subset of ``dataset``: a fraction in (0, 1], a sample count >= 1, or everything.

    Re-alignment and sample-efficiency studies train on a labelled budget; the subset is the same
    on every rank and in every run with the same seed.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if budget is None:
        return dataset
    if isinstance(budget, float) and not isinstance(budget, bool):
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"A budget fraction must lie in (0, 1], got {budget}.")
        count = max(1, round(budget * n))
    else:
        count = int(budget)
        if count < 1:
            raise ValueError(
                f"The labelled budget is empty ({budget} samples); give at least 1 sample "
                "or a fraction in (0, 1]."
            )
    if count >= n:
        return dataset
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count]
    return Subset(dataset, sorted(order.tolist()))


class DenseDataModule(L.LightningDataModule):
    """Base datamodule for single-input, multi-output dense prediction.

    Args:
        tasks: the tasks to load (a subset of the dataset's tasks); ``None`` means all of them.
        batch_size: training batch size (per device).
        eval_batch_size: batch size for val / test / predict (defaults to ``batch_size``).
        num_workers: loader worker processes.
        pin_memory: pin host memory for faster host-to-GPU copies.
        persistent_workers: keep workers alive between epochs (only with ``num_workers > 0``).
        train_budget: train on a seeded subset (fraction in (0, 1] or a sample count).
        train_split: which split feeds training (``"val"`` for re-alignment on the small
            labelled validation split, as in the SIMO paper).
        seed: seed for subsets and splits.
    """

    dataset_tasks: ClassVar[dict[str, int | None]] = {}
    """Tasks this dataset carries, with their class count (``None`` for non-classification)."""

    def __init__(
        self,
        tasks: list[str] | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        train_budget: float | int | None = None,
        train_split: str = "train",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.tasks = self._check_tasks(tasks)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if train_split not in SPLITS:
            raise ValueError(f"train_split must be one of {SPLITS}, got {train_split!r}.")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.train_budget = train_budget
        self.train_split = train_split
        self.seed = seed
        self.datasets: dict[str, Dataset] = {}

    # ------------------------------------------------------------------ facts for the model
    @property
    def num_classes(self) -> dict[str, int]:
        """Class counts of the selected classification tasks (linked to the model's init)."""
        return {t: n for t in self.tasks if (n := self.dataset_tasks.get(t)) is not None}

    def _check_tasks(self, tasks: Sequence[str] | None) -> list[str]:
        carried = list(self.dataset_tasks)
        if tasks is None:
            return carried
        if isinstance(tasks, str):
            tasks = [tasks]
        tasks = list(tasks)
        if not tasks:
            raise ValueError(f"No task selected; choose some of {carried}.")
        known = set(available_tasks())
        for t in tasks:
            if t not in known:
                raise ValueError(
                    f"Unknown task {t!r}. Known tasks: {', '.join(sorted(known))}. "
                    f"{type(self).__name__} carries: {', '.join(carried)}."
                )
            if t not in self.dataset_tasks:
                raise ValueError(
                    f"Task {t!r} is not provided by {type(self).__name__}; "
                    f"it carries: {', '.join(carried)}."
                )
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"A task is listed twice in {tasks}; list each task once.")
        return tasks

    # ------------------------------------------------------------------ datasets
    def make_dataset(self, split: str, train: bool) -> Dataset:
        """Build the dataset of ``split``; ``train=True`` turns training augmentation on."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None):
            train = self.make_dataset(self.train_split, train=True)
            self.datasets["train"] = select_budget(train, self.train_budget, self.seed)
            self.datasets["val"] = self.make_dataset("val", train=False)
        if stage in ("validate",):
            self.datasets["val"] = self.make_dataset("val", train=False)
        if stage in ("test", "predict", None):
            self.datasets["test"] = self.make_dataset("test", train=False)

    def split_dataset(self, split: str) -> Dataset:
        """The un-augmented dataset of a split (for α search, feature caching, analysis)."""
        return self.make_dataset(split, train=False)

    def _loader(self, dataset: Dataset, shuffle: bool, batch_size: int) -> DataLoader:
        """Shuffled loaders are resumable mid-epoch (:mod:`lightning_simo.data.sampling`); every
        loader seeds its workers from a generator of its own, so making an iterator never moves
        the global generator that dropout and checkpointed random states share."""
        options: dict[str, Any] = {
            "batch_size": batch_size,
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers,
            "drop_last": False,
            "generator": torch.Generator().manual_seed(shuffle_seed()),
        }
        if not shuffle:
            return DataLoader(dataset, shuffle=False, **options)
        epoch, batches = resume_position(self.trainer)
        sampler = ResumableSampler(dataset, shuffle_seed(), epoch, skip=batches * batch_size)
        return ResumableLoader(SeededSamples(dataset), sampler=sampler, **options)

    def loader(self, split: str, batch_size: int | None = None) -> DataLoader:
        """An ordered, un-augmented loader over a whole split."""
        return self._loader(self.split_dataset(split), False, batch_size or self.eval_batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["train"], True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["val"], False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["test"], False, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
