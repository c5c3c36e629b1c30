"""Streaming datasets: any datamodule's splits as litdata optimized chunks, read back lazily.

Taskonomy's four million images do not sit on a node's local disk; litdata streams chunked,
optimized datasets from object storage (``s3://...``) or a shared folder, caching chunks
locally. :func:`write_litdata` converts every split of a :class:`DenseDataModule` with
``litdata.optimize``; :class:`StreamingDenseDataModule` reads it with ``litdata.StreamingDataset``
and ``StreamingDataLoader``. Samples are stored *un-augmented*, in the numpy layout the
transforms work on (``H x W x C`` images and normals, ``H x W`` maps), so training augmentation
is the same pipeline as the file datamodules' (:func:`~lightning_simo.data.transforms.
build_transform`) and evaluation samples are identical tensors. Each split folder holds a
``lightning_simo.json`` with the tasks (and class counts), sizes and source datamodule, so the
model gets the same ``tasks`` and ``num_classes`` links.

``StreamingDataLoader`` has a ``state_dict``: Lightning stores it in checkpoints, so a run
resumed mid-epoch continues the epoch where it stopped instead of starting it again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_simo.data.base import SPLITS, DenseDataModule
from lightning_simo.data.transforms import build_transform, dense_keys, to_tensor_sample

__all__ = ["INFO_NAME", "StreamingDenseDataModule", "to_numpy_sample", "write_litdata"]

INFO_NAME = "lightning_simo.json"


def to_numpy_sample(sample: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The inverse of :func:`to_tensor_sample`: tensors back to the numpy layout of transforms."""
    out: dict[str, np.ndarray] = {}
    maps = {"image", *dense_keys()}
    for key, value in sample.items():
        array = value.detach().cpu().numpy()
        if key in maps and array.ndim == 3:  # CxHxW float maps: 1xHxW -> HxW, else HxWxC
            array = array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)
            array = np.ascontiguousarray(array)
        out[key] = array
    return out


class _NumpySample:
    """``litdata.optimize``'s function: sample ``i`` of a dataset in numpy layout (picklable)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        return to_numpy_sample(self.dataset[index])


def _is_url(root: str) -> bool:
    return "://" in root


def write_litdata(
    datamodule: DenseDataModule,
    output_dir: str | Path,
    splits: Sequence[str] = SPLITS,
    chunk_bytes: str = "64MB",
    num_workers: int = 1,
    start_method: str | None = None,
) -> dict[str, int]:
    """Write ``splits`` of ``datamodule`` (un-augmented) under ``output_dir/<split>``.

    Returns the sample count per split. ``output_dir`` may be a local folder or a URL litdata
    can write to. Existing split folders are refused (litdata would append to them).
    ``start_method`` is litdata's for its writer processes (``"fork"`` starts fastest).
    """
    import litdata

    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; choose among {list(SPLITS)}")
    root = str(output_dir).rstrip("/")
    counts: dict[str, int] = {}
    for split in splits:
        target = f"{root}/{split}"
        if not _is_url(root) and Path(target).exists() and any(Path(target).iterdir()):
            raise ValueError(f"{target} already exists; remove it or choose another --out")
        dataset = datamodule.split_dataset(split)
        counts[split] = len(dataset)  # type: ignore[arg-type]
        litdata.optimize(
            fn=_NumpySample(dataset),
            inputs=list(range(counts[split])),
            output_dir=target,
            chunk_bytes=chunk_bytes,
            num_workers=num_workers,
            verbose=False,
            mode=None,
            start_method=start_method,
        )
        info = {
            "source": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}",
            "tasks": {t: datamodule.dataset_tasks.get(t) for t in datamodule.tasks},
            "samples": counts[split],
        }
        _write_info(target, info)
    return counts


def _write_info(target: str, info: Mapping[str, Any]) -> None:
    text = json.dumps(info, indent=2) + "\n"
    if _is_url(target):
        import fsspec

        with fsspec.open(f"{target}/{INFO_NAME}", "w") as handle:
            handle.write(text)
        return
    from lightning_simo.io import atomic_write_text

    atomic_write_text(Path(target) / INFO_NAME, text)


def _read_info(target: str) -> dict[str, Any]:
    try:
        if _is_url(target):
            import fsspec

            with fsspec.open(f"{target}/{INFO_NAME}", "r") as handle:
                return json.load(handle)
        return json.loads((Path(target) / INFO_NAME).read_text(encoding="utf-8"))
    except (OSError, ImportError, ValueError) as err:
        raise FileNotFoundError(
            f"no optimized dataset at {target} ({INFO_NAME} unreadable: {err}); write it with "
            "`lightning_simo prepare --format litdata`"
        ) from None


class _Decode:
    """StreamingDataset transform: stored numpy sample -> (augmented) tensors of the tasks."""

    def __init__(self, tasks: Sequence[str], transform: Any | None) -> None:
        self.keep = {"image", "index", *tasks}
        self.transform = transform

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        sample = {k: np.asarray(v) for k, v in sample.items() if k in self.keep}
        if self.transform is not None:
            sample = self.transform(sample)
        return to_tensor_sample(sample)


class StreamingDenseDataModule(DenseDataModule):
    """The splits written by :func:`write_litdata`, streamed from a folder or ``s3://`` URL.

    Args:
        root: the folder or URL given to ``prepare --format litdata`` (holding ``train/``,
            ``val/``, ``test/``).
        tasks: tasks to load (a subset of those stored; default: all).
        height, width: the training crop (the stored image size when augmenting).
        augment: augment the training split (random rescale, crop, flip, as the file
            datamodules do).
        scales, hflip: the augmentation's zoom factors and horizontal flips.
        shuffle: shuffle the training split (litdata's chunk-then-sample shuffle, from ``seed``).
        cache_dir: where remote chunks are cached (litdata's default when ``None``).
        max_cache_size: litdata's cache limit (e.g. ``"50GB"``).
        batch_size, eval_batch_size, num_workers, pin_memory, persistent_workers, train_split,
            seed: see :class:`~lightning_simo.data.base.DenseDataModule` (``train_budget`` is
            not supported: subsample when writing instead).
    """

    dataset_tasks: ClassVar[dict[str, int | None]] = {}

    def __init__(
        self,
        root: str,
        tasks: list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        augment: bool = False,
        scales: Sequence[float] = (1.0, 1.2),
        hflip: bool = True,
        shuffle: bool = True,
        cache_dir: str | None = None,
        max_cache_size: str = "100GB",
        **kwargs: Any,
    ) -> None:
        if kwargs.get("train_budget") is not None:
            raise ValueError(
                "train_budget is not supported by StreamingDenseDataModule; write a subset "
                "with `lightning_simo prepare` instead"
            )
        self.root = str(root).rstrip("/")
        info = _read_info(f"{self.root}/{kwargs.get('train_split', 'train')}")
        self.dataset_tasks = dict(info["tasks"])  # instance attribute: what this dataset holds
        super().__init__(tasks=tasks, **kwargs)
        if augment and (height is None or width is None):
            raise ValueError("augment needs the training crop: set height and width")
        self.height, self.width = height, width
        self.augment = augment
        self.scales = tuple(float(s) for s in scales)
        self.hflip = hflip
        self.shuffle = shuffle
        self.cache_dir = cache_dir
        self.max_cache_size = max_cache_size

    def make_dataset(self, split: str, train: bool) -> Dataset:
        import litdata

        target = f"{self.root}/{split}"
        _read_info(target)  # one clear error for a missing split
        transform = None
        if train and self.augment:
            transform = build_transform(
                train=True, crop=(self.height, self.width), scales=self.scales, hflip=self.hflip
            )
        return litdata.StreamingDataset(
            input_dir=target,
            cache_dir=self.cache_dir,
            shuffle=train and self.shuffle,
            drop_last=False,
            seed=self.seed,
            max_cache_size=self.max_cache_size,
            transform=_Decode(self.tasks, transform),
        )

    def _loader(self, dataset: Dataset, shuffle: bool, batch_size: int) -> Any:
        import litdata

        # the order is the dataset's (shuffled from `seed` for training): not the sampler's
        return litdata.StreamingDataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )
