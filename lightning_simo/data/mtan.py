"""The MTAN ``.npy`` layout that NYUv2 and Cityscapes share, read once for both.

MTAN (Liu, Johns, Davison 2019) and the SIMO paper store each dataset as two folders of numbered
``.npy`` files, ``train/`` and ``val/``, with one subfolder per modality (``image/`` plus one per
task). A dataset is then fully described by :class:`MTANLayout`: its subfolder and converter per
task (the converter table is where a dataset's own storage convention for a task lives), and its
:class:`SplitRule`, i.e. which stored folder is cut in two by a seeded permutation to give the
labelled validation split. Concrete datasets (``nyuv2.py``, ``cityscapes.py``) only configure it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from lightning_simo.data._files import (
    Transform,
    check_same_keys,
    check_same_size,
    count_from,
    finish_sample,
    list_files,
    load_npy,
    require_dir,
    seeded_split,
    sorted_keys,
    to_image,
)
from lightning_simo.data.base import SPLITS, DenseDataModule
from lightning_simo.data.transforms import build_transform

__all__ = ["MTANDataModule", "MTANDataset", "MTANLayout", "SplitRule", "TaskReader"]


@dataclass(frozen=True)
class TaskReader:
    """Where a task is stored (subfolder of each split folder) and how its array is checked and
    converted to the conventions of :mod:`lightning_simo.tasks` (``convert(array, path)``)."""

    folder: str
    convert: Callable[[np.ndarray, Path], np.ndarray]


@dataclass(frozen=True)
class SplitRule:
    """Which stored folder each split reads.

    ``whole`` is read entirely by one split; ``divided`` is cut by a seeded permutation into the
    two splits of ``parts``: the first ``num_val`` (or all but ``num_val``, when the val split is
    the second part) indices of the permutation go to ``parts[0]``.

    Args:
        whole: ``(split, folder)`` read whole.
        divided: the folder cut in two.
        parts: the two splits the cut gives, in permutation order; one of them is ``"val"``.
    """

    whole: tuple[str, str]
    divided: str
    parts: tuple[str, str]

    def folder(self, split: str) -> str:
        return self.whole[1] if split == self.whole[0] else self.divided


@dataclass(frozen=True)
class MTANLayout:
    """Everything that tells one MTAN-layout dataset from another."""

    name: str
    description: str
    readers: Mapping[str, TaskReader]
    split_rule: SplitRule


class MTANDataset(Dataset):
    """One split of an MTAN-layout dataset as dicts of tensors (``"image"``, tasks, ``"index"``).

    Args:
        layout: the dataset's folders, converters and split rule.
        root: the folder holding ``train/`` and ``val/`` (see ``layout.description``).
        split: ``"train"``, ``"val"`` or ``"test"`` (mapped to folders by ``layout.split_rule``).
        tasks: tasks to read (keys of ``layout.readers``); only their folders are read.
        transform: applied to the numpy sample (HWC) before conversion to tensors.
        num_val: images of the divided folder that form the val split (a count, or a fraction
            in (0, 1)).
        split_seed: seed of the permutation that divides the folder.
    """

    def __init__(
        self,
        layout: MTANLayout,
        root: str | Path,
        split: str,
        tasks: Sequence[str],
        transform: Transform | None,
        num_val: int | float,
        split_seed: int,
    ) -> None:
        name, readers = layout.name, layout.readers
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
        unknown = [t for t in tasks if t not in readers]
        if unknown:
            raise ValueError(f"{name} has no task {unknown[0]!r}; it carries {list(readers)}.")
        self.layout = layout
        self.tasks = list(tasks)
        self.split = split
        self.transform = transform

        root = require_dir(name, Path(root), layout.description)
        base = root / layout.split_rule.folder(split)
        images = list_files(name, base / "image", ".npy", layout.description)
        folders = {t: base / readers[t].folder for t in self.tasks}
        targets = {
            t: list_files(name, folder, ".npy", layout.description) for t, folder in folders.items()
        }
        check_same_keys(name, (base / "image", images), {folders[t]: f for t, f in targets.items()})
        keys = sorted_keys(images)
        if split != layout.split_rule.whole[0]:
            keys = [keys[i] for i in self._part(keys, base, num_val, split_seed)]
        self.files = [{"image": images[k], **{t: targets[t][k] for t in self.tasks}} for k in keys]

    def _part(self, keys: list[str], base: Path, num_val: int | float, seed: int) -> list[int]:
        """The indices of ``self.split`` in the divided folder; an empty split is refused."""
        total, parts = len(keys), self.layout.split_rule.parts
        n_val = count_from(num_val, total, "num_val")
        if n_val > total:
            raise ValueError(
                f"{self.layout.name}: num_val={num_val} exceeds the {total} images in "
                f"{str(base)!r}; choose num_val between 1 and {total - 1}."
            )
        first = n_val if parts[0] == "val" else total - n_val
        divided = dict(zip(parts, seeded_split(total, first, seed), strict=True))
        for split in (self.split, *parts):
            if not divided[split]:
                raise ValueError(
                    f"{self.layout.name}: the {split!r} split is empty: num_val={num_val} of the "
                    f"{total} images in {str(base)!r}. Choose num_val between 1 and {total - 1}."
                )
        return divided[self.split]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        paths = self.files[index]
        sample = {"image": to_image(load_npy(paths["image"]), paths["image"])}
        for task in self.tasks:
            sample[task] = self.layout.readers[task].convert(load_npy(paths[task]), paths[task])
        check_same_size(sample, paths)
        return finish_sample(sample, self.transform, index, self.tasks)


class MTANDataModule(DenseDataModule):
    """Shared datamodule of the MTAN-layout datasets; subclasses set defaults and build
    :meth:`dataset`.

    Training augmentation follows the SIMO paper: a random scale in ``scales`` (labels nearest,
    depth-like values corrected by each task's registered geometry), a random ``crop`` and a
    horizontal flip (normal x negated). Evaluation uses the full, un-augmented image.

    Args:
        root: dataset folder.
        tasks: a subset of the dataset's tasks; ``None`` means all of them.
        crop: training crop ``(height, width)``; ``None`` trains on whole (rescaled) images.
        scales: random rescaling factors for training.
        hflip: random horizontal flips for training.
        num_val: images of the divided folder used as the val split (count or fraction).
        split_seed: seed of that division (42 reproduces the SIMO splits).
        **kwargs: the loader, budget and seed settings of
            :class:`~lightning_simo.data.base.DenseDataModule` (``batch_size``,
            ``num_workers``, ``train_budget``, ``train_split``, ...).
    """

    def __init__(
        self,
        root: str,
        tasks: list[str] | None = None,
        crop: tuple[int, int] | None = None,
        scales: Sequence[float] = (1.0, 1.2, 1.5),
        hflip: bool = True,
        num_val: int | float = 0.2,
        split_seed: int = 42,
        **kwargs: Any,
    ) -> None:
        super().__init__(tasks=tasks, **kwargs)
        self.root = root
        self.crop = tuple(crop) if crop is not None else None
        self.scales = tuple(scales)
        self.hflip = hflip
        self.num_val = num_val
        self.split_seed = split_seed

    def dataset(self, split: str, transform: Transform) -> MTANDataset:
        """The dataset of ``split`` with ``transform`` (each subclass builds its own)."""
        raise NotImplementedError

    def make_dataset(self, split: str, train: bool) -> MTANDataset:
        if train:
            transform = build_transform(True, crop=self.crop, scales=self.scales, hflip=self.hflip)
        else:
            transform = build_transform(False)
        return self.dataset(split, transform)
