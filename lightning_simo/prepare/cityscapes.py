"""Cityscapes from the official ``leftImg8bit``, ``gtFine`` and ``disparity`` packages.

``--source`` holds the three unpacked folders (``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png``,
``gtFine/.../*_gtFine_labelIds.png``, ``disparity/.../*_disparity.png``). Writes ``train/`` and
``val/`` at MTAN's 128 x 256 with ``image/``, ``label_19/`` (the 19 evaluation classes, -1 =
ignore), ``label_7/`` (the 7 categories flat, construction, object, nature, sky, human, vehicle;
void = -1) and ``depth/``: the disparity in pixels of the resized image (the official 16-bit
PNG's ``(p - 1) / 256``, scaled by the resize, 0 = invalid), which the loader reads as its
``disparity`` task. Part segmentation is not part of the official packages and is not written.

Label tables: ``labels.py`` of the official cityscapesScripts (``trainId`` and ``category``).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

__all__ = ["CityscapesSource", "LABEL_19", "LABEL_7", "add_arguments", "open_source"]

SPLITS = ("train", "val")
FOLDERS = {
    "leftImg8bit": "_leftImg8bit.png",
    "gtFine": "_gtFine_labelIds.png",
    "disparity": "_disparity.png",
}
_TARGET_FOLDERS = tuple(folder for folder in FOLDERS if folder != "leftImg8bit")

# labelId -> trainId (cityscapesScripts labels.py); every other id is ignored
_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
# labelId -> category id - 1 (flat 7-10, construction 11-16, object 17-20, nature 21-22,
# sky 23, human 24-25, vehicle 26-33); void (0-6) is ignored
_CATEGORIES = {i: c for c, ids in enumerate(
    [range(7, 11), range(11, 17), range(17, 21), range(21, 23), range(23, 24), range(24, 26),
     range(26, 34)]
) for i in ids}  # fmt: skip


def _table(mapping: dict[int, int]) -> np.ndarray:
    table = np.full(256, -1, dtype=np.int16)
    for label_id, value in mapping.items():
        table[label_id] = value
    return table


LABEL_19 = _table(_TRAIN_IDS)
LABEL_7 = _table(_CATEGORIES)


class CityscapesSource:
    """The three official folders, every image paired with its labels and disparity."""

    def __init__(self, source: str | Path, size: tuple[int, int] = (128, 256)) -> None:
        root = Path(source)
        absent = [str(root / f) for f in FOLDERS if not (root / f).is_dir()]
        if absent:
            raise FileNotFoundError(
                f"Cityscapes source incomplete: missing folder(s) {', '.join(absent)}. Unpack "
                "leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip and "
                "disparity_trainvaltest.zip from https://www.cityscapes-dataset.com into --source."
            )
        self.items: dict[str, list[dict[str, Path]]] = {}
        missing: list[str] = []
        for split in SPLITS:
            images = sorted((root / "leftImg8bit" / split).glob(f"*/*{FOLDERS['leftImg8bit']}"))
            entries = []
            for image in images:
                stem = image.name[: -len(FOLDERS["leftImg8bit"])]
                entry = {"leftImg8bit": image}
                for folder in _TARGET_FOLDERS:
                    path = root / folder / split / image.parent.name / f"{stem}{FOLDERS[folder]}"
                    entry[folder] = path
                    if not path.is_file():
                        missing.append(str(path))
                entries.append(entry)
            self.items[split] = entries
        if missing:
            shown = "\n  ".join(missing[:10])
            more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise FileNotFoundError(
                f"Cityscapes source incomplete: {len(missing)} file(s) missing:\n  {shown}{more}"
            )
        empty = [s for s in SPLITS if not self.items[s]]
        if empty:
            raise FileNotFoundError(
                f"Cityscapes source incomplete: no *_leftImg8bit.png under "
                f"{', '.join(str(root / 'leftImg8bit' / s) for s in empty)}."
            )
        self.size = (int(size[0]), int(size[1]))

    def counts(self) -> dict[str, int]:
        return {split: len(entries) for split, entries in self.items.items()}

    def _read(self, path: Path, flags: int) -> np.ndarray:
        array = cv2.imread(str(path), flags)
        if array is None:
            raise ValueError(f"Cannot read {str(path)!r} (corrupt or not an image).")
        return array

    def samples(self) -> Iterator[tuple[str, int, dict[str, np.ndarray]]]:
        h, w = self.size
        for split, entries in self.items.items():
            for i, entry in enumerate(entries):
                bgr = self._read(entry["leftImg8bit"], cv2.IMREAD_COLOR)
                image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                ids = self._read(entry["gtFine"], cv2.IMREAD_UNCHANGED)
                raw = self._read(entry["disparity"], cv2.IMREAD_UNCHANGED).astype(np.float32)
                disparity = np.where(raw > 0, (raw - 1.0) / 256.0, 0.0).astype(np.float32)
                disparity *= w / image.shape[1]  # disparity is in pixels of the image width
                ids = cv2.resize(ids, (w, h), interpolation=cv2.INTER_NEAREST)
                yield (
                    split,
                    i,
                    {
                        "image": cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA).astype(
                            np.float32
                        )
                        / 255.0,
                        "label_19": LABEL_19[ids],
                        "label_7": LABEL_7[ids],
                        "depth": cv2.resize(disparity, (w, h), interpolation=cv2.INTER_NEAREST),
                    },
                )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source", required=True, help="folder holding leftImg8bit/, gtFine/ and disparity/"
    )
    parser.add_argument(
        "--size", type=int, nargs=2, default=(128, 256), metavar=("H", "W"), help="output size"
    )


def open_source(ns: argparse.Namespace) -> CityscapesSource:
    return CityscapesSource(ns.source, tuple(ns.size))
