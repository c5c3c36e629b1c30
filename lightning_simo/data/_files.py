"""Reading dataset files and checking dataset layouts, with errors that say what to fix.

The NYUv2, Cityscapes and Taskonomy loaders share these helpers so that every dataset reports a
missing folder, a count mismatch, a corrupt file or a bad label the same way: one exception whose
message names the offending path and, for layout problems, shows the expected folder tree.
Checks here are cheap by design: layouts are checked by listing directories once, file contents
are checked when a sample is loaded (a min / max per label map, nothing per pixel in Python).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

from lightning_simo.data.transforms import to_tensor_sample
from lightning_simo.tasks import IGNORE_INDEX

__all__ = [
    "Transform",
    "check_same_keys",
    "check_same_size",
    "count_from",
    "finish_sample",
    "list_files",
    "load_npy",
    "missing_error",
    "read_png",
    "require_dir",
    "seeded_split",
    "sorted_keys",
    "to_image",
    "to_labels",
    "to_scalar_map",
    "to_vector_map",
]

Transform = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
"""A transform on a numpy sample dict (HWC layout), as built by ``transforms.build_transform``."""

_DOCS_HINT = "See docs/datasets.md for how to obtain and lay out the dataset."


# ----------------------------------------------------------------------------- layout
def missing_error(dataset: str, path: Path, layout: str, what: str = "folder") -> FileNotFoundError:
    """The one error for an absent dataset piece: the missing path plus the expected tree."""
    return FileNotFoundError(
        f"{dataset}: the {what} {str(path)!r} does not exist; check the dataset root "
        "(--data.init_args.root) and that its layout matches the tree below.\n"
        f"Expected layout:\n{layout.rstrip()}\n{_DOCS_HINT}"
    )


def require_dir(dataset: str, path: Path, layout: str) -> Path:
    """Return ``path`` if it is a directory, else raise :func:`missing_error`."""
    if not path.is_dir():
        raise missing_error(dataset, path, layout)
    return path


def list_files(
    dataset: str, folder: Path, suffix: str, layout: str, key: Callable[[str], str] | None = None
) -> dict[str, Path]:
    """Map a matching key (the stem by default) to each ``*suffix`` file of ``folder``.

    Raises if the folder is missing or holds no such file: an empty folder is as unusable as a
    missing one and usually means an interrupted extraction.
    """
    require_dir(dataset, folder, layout)
    key = key or (lambda stem: stem)
    files: dict[str, Path] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.endswith(suffix):
                continue
            files[key(entry.name[: -len(suffix)])] = Path(entry.path)
    if not files:
        raise FileNotFoundError(
            f"{dataset}: the folder {str(folder)!r} holds no '*{suffix}' file.\n"
            f"Expected layout:\n{layout.rstrip()}\n{_DOCS_HINT}"
        )
    return files


def sorted_keys(keys: Iterable[str]) -> list[str]:
    """Keys in a stable order: numerically when all are integers (``2.npy`` before ``10.npy``)."""
    keys = list(keys)
    if all(k.isdigit() for k in keys):
        return sorted(keys, key=int)
    return sorted(keys)


def check_same_keys(
    dataset: str,
    reference: tuple[Path, Mapping[str, Path]],
    others: Mapping[Path, Mapping[str, Path]],
) -> None:
    """Every task folder must hold one file per input image, matched by key.

    A count mismatch names both folders and both counts; equal counts with different names name
    one unmatched file, which is enough to find the cause (a renamed or partial download).
    """
    ref_dir, ref_files = reference
    for folder, files in others.items():
        if len(files) != len(ref_files):
            raise ValueError(
                f"{dataset}: {str(folder)!r} holds {len(files)} files but {str(ref_dir)!r} holds "
                f"{len(ref_files)}; every task folder needs exactly one file per image. "
                "Re-extract the dataset or remove the stray files."
            )
        missing = set(ref_files) - set(files)
        if missing:
            example = sorted(missing)[0]
            raise ValueError(
                f"{dataset}: {str(folder)!r} has no file matching {str(ref_files[example])!r} "
                f"({len(missing)} unmatched in all); files are matched by name across folders."
            )


# ----------------------------------------------------------------------------- splits
def count_from(value: int | float, total: int, name: str) -> int:
    """A sample count from a count (``int``) or a fraction of ``total`` (``float`` in (0, 1))."""
    if isinstance(value, float) and not isinstance(value, bool):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} as a fraction must lie in (0, 1), got {value}.")
        return round(value * total)
    count = int(value)
    if count < 0:
        raise ValueError(f"{name} must be >= 0, got {value}.")
    return count


def seeded_split(total: int, first: int, seed: int) -> tuple[list[int], list[int]]:
    """Split ``range(total)`` into ``first`` and ``total - first`` indices by a seeded permutation.

    The permutation is ``torch.randperm(total)`` under ``manual_seed(seed)``, the one
    ``torch.utils.data.random_split(range(total), [first, total - first], generator)`` draws, so the
    same seed gives the same two sets as code that used ``random_split``. Each part is returned
    sorted so that iteration order follows the files on disk.
    """
    if not 0 <= first <= total:
        raise ValueError(f"Cannot take {first} of {total} samples.")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[:first]), sorted(order[first:])


# ----------------------------------------------------------------------------- reading
def load_npy(path: Path) -> np.ndarray:
    """``np.load`` without pickles, reporting a corrupt or truncated file by name."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(
            f"Cannot read {str(path)!r} as a .npy array ({err}); the file is corrupt or "
            "truncated. Re-extract it."
        ) from err
    if not isinstance(array, np.ndarray):  # an .npz archive saved under a .npy name
        raise ValueError(f"{str(path)!r} is not a single .npy array; re-extract it.")
    return array


def read_png(path: Path) -> np.ndarray:
    """Read a PNG at its stored bit depth (16-bit stays ``uint16``), colour channels as RGB."""
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise ValueError(
            f"Cannot decode {str(path)!r} as an image; the file is corrupt, truncated or not a "
            "PNG. Re-download it."
        )
    if array.ndim == 3 and array.shape[2] == 4:
        return cv2.cvtColor(array, cv2.COLOR_BGRA2RGB)
    if array.ndim == 3 and array.shape[2] == 3:
        return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    return array


# ----------------------------------------------------------------------------- decoding
def _single_channel(array: np.ndarray, path: Path, what: str) -> np.ndarray:
    if array.ndim == 3 and array.shape[2] == 1:  # MTAN stores some maps as H x W x 1
        array = array[..., 0]
    if array.ndim != 2:
        raise ValueError(
            f"{str(path)!r}: a {what} must be H x W (or H x W x 1), got shape {array.shape}."
        )
    return array


def to_image(array: np.ndarray, path: Path) -> np.ndarray:
    """An ``H x W x 3`` ``float32`` image in [0, 1] (``uint8`` input is divided by 255)."""
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"{str(path)!r}: an image must be H x W x 3, got shape {array.shape}.")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise ValueError(f"{str(path)!r}: the image holds NaN or infinite values.")
    return array


def to_labels(array: np.ndarray, num_classes: int, path: Path) -> np.ndarray:
    """``int64`` ``H x W`` class indices, checked to lie in ``[-1, num_classes)``.

    Float label maps (as MTAN stores them) must hold whole numbers. The check costs one min / max
    per map, so it runs on every load and a bad file is caught the first time it is read.
    """
    array = _single_channel(array, path, "label map")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{str(path)!r}: the label map holds NaN or infinite values.")
        fractional = array != np.round(array)
        if fractional.any():
            raise ValueError(
                f"{str(path)!r}: label values must be whole numbers, found {array[fractional][0]}."
            )
    if array.size:
        low, high = array.min(), array.max()
        bad = low if low < IGNORE_INDEX else high if high >= num_classes else None
        if bad is not None:
            raise ValueError(
                f"{str(path)!r}: label value {bad.item()} is outside [{IGNORE_INDEX}, "
                f"{num_classes}) ({num_classes} classes, {IGNORE_INDEX} = ignore). Check the "
                "class count setting or the label files."
            )
    return array.astype(np.int64)


def to_scalar_map(
    array: np.ndarray, path: Path, what: str, invalid_zero: bool = False
) -> np.ndarray:
    """A finite ``float32`` ``H x W`` map (depth, disparity, ...).

    ``invalid_zero``: the map is non-negative with 0 marking invalid pixels (metric depth), so a
    negative value is a corrupt file, not a target to learn; one min per map finds it.
    """
    array = _single_channel(array, path, what).astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise ValueError(f"{str(path)!r}: the {what} holds NaN or infinite values.")
    if invalid_zero and array.size and (low := float(array.min())) < 0:
        raise ValueError(
            f"{str(path)!r}: the {what} holds negative values (e.g. {low:g}); it must be >= 0 "
            "with 0 = invalid. Re-extract the file or fix its conversion."
        )
    return array


def to_vector_map(array: np.ndarray, path: Path, what: str) -> np.ndarray:
    """A finite ``float32`` ``H x W x 3`` map (surface normals)."""
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"{str(path)!r}: a {what} must be H x W x 3, got shape {array.shape}.")
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise ValueError(f"{str(path)!r}: the {what} holds NaN or infinite values.")
    return array


def check_same_size(sample: Mapping[str, np.ndarray], paths: Mapping[str, Path]) -> None:
    """All maps of one sample share the image's height and width (else the targets misalign)."""
    size = sample["image"].shape[:2]
    for key, array in sample.items():
        if array.shape[:2] != size:
            raise ValueError(
                f"{str(paths[key])!r} is {array.shape[0]}x{array.shape[1]} but its image "
                f"{str(paths['image'])!r} is {size[0]}x{size[1]}; targets must match the image."
            )


def finish_sample(
    sample: dict[str, np.ndarray],
    transform: Transform | None,
    index: int,
    tasks: Sequence[str],
) -> dict[str, Tensor]:
    """Transform a numpy sample, convert it to tensors and add its ``index`` in the split.

    Keys other than the image and the selected tasks (helpers a loader needed) are dropped, so a
    batch holds exactly what the model and the metrics expect.
    """
    if transform is not None:
        sample = transform(sample)
    out = to_tensor_sample(sample)
    out = {k: v for k, v in out.items() if k == "image" or k in tasks}
    out["index"] = torch.tensor(index, dtype=torch.int64)
    return out
