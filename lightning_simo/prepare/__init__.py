"""``lightning_simo prepare``: official dataset downloads -> the layout the loaders read.

::

    lightning_simo prepare nyuv2 --source nyu_depth_v2_labeled.mat --out data/nyuv2
    lightning_simo prepare cityscapes --source downloads/cityscapes --out data/cityscapes

Each dataset module opens its source (:class:`Source`): it checks the whole source first and
refuses a partial one, naming the missing files, before anything is written; then it yields
samples ``(split, index, {folder: array})``. A writer registered in :data:`FORMATS` (``npy``:
MTAN's one-``.npy``-per-sample layout) stores them into a hidden folder next to ``--out`` that is
renamed into place only once complete, so an interrupted run leaves nothing that looks done.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lightning_simo.io import atomic_folder
from lightning_simo.registry import Registry

__all__ = ["DATASETS", "FORMATS", "NpyLayoutWriter", "Source", "main", "prepare"]

Sample = tuple[str, int, Mapping[str, np.ndarray]]


class Source(Protocol):
    """An opened, fully checked dataset source."""

    def counts(self) -> dict[str, int]:
        """Samples per output split (``train``, ``val``)."""
        ...

    def samples(self) -> Iterator[Sample]:
        """``(split, index within split, {folder: array})`` for every sample."""
        ...


class NpyLayoutWriter:
    """MTAN's layout: ``<root>/<split>/<folder>/<index>.npy``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, split: str, index: int, arrays: Mapping[str, np.ndarray]) -> None:
        for folder, array in arrays.items():
            path = self.root / split / folder / f"{index}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, array)

    def close(self) -> None:
        pass


FORMATS: Registry[type[NpyLayoutWriter]] = Registry("prepare format", "choose one with --format")
"""Output formats of ``prepare`` (``--format``): a class taking the output folder, with
``write(split, index, arrays)`` and ``close()``."""
FORMATS.register("npy", NpyLayoutWriter)

DATASETS = {
    "nyuv2": "lightning_simo.prepare.nyuv2",
    "cityscapes": "lightning_simo.prepare.cityscapes",
}
"""Dataset name -> module with ``add_arguments(parser)`` and ``open_source(namespace)``."""


def _progress(samples: Iterator[Sample], total: int, what: str) -> Iterator[Sample]:
    """A rich progress bar on a terminal, a line every 10% otherwise."""
    if sys.stdout.isatty():
        from rich.progress import track

        yield from track(samples, total=total, description=what)
        return
    start, step = time.monotonic(), max(1, total // 10)
    for done, sample in enumerate(samples, 1):
        yield sample
        if done % step == 0 or done == total:
            print(f"[prepare] {what}: {done}/{total} ({time.monotonic() - start:.0f}s)", flush=True)


def prepare(source: Source, out: str | Path, fmt: str = "npy", force: bool = False) -> Path:
    """Write every sample of ``source`` at ``out`` through the ``fmt`` writer, atomically."""
    writer_cls = FORMATS.get(fmt)
    with atomic_folder(out, force) as tmp:
        writer = writer_cls(tmp)
        counts = source.counts()
        for split, index, arrays in _progress(
            source.samples(), sum(counts.values()), Path(out).name
        ):
            writer.write(split, index, arrays)
        writer.close()
    return Path(out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning_simo prepare",
        description="Convert an official dataset download into the layout the loaders read "
        "(or write any datamodule's splits for streaming: prepare --format litdata --config "
        "CONFIG --out DIR|s3://...).",
    )
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="{nyuv2,cityscapes}")
    for name, module_name in DATASETS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.__doc__.splitlines()[0] if module.__doc__ else "")
        module.add_arguments(p)
        p.add_argument("--out", required=True, help="the dataset folder to write")
        p.add_argument(
            "--format", default="npy", help=f"output format ({', '.join(FORMATS.names())})"
        )
        p.add_argument("--force", action="store_true", help="replace an existing --out")
    return parser


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] not in DATASETS and "litdata" in argv:
        # `prepare --format litdata --config ...`: a datamodule's splits for streaming
        from lightning_simo.prepare.litdata import main as write_streaming

        write_streaming(argv)
        return
    ns = _parser().parse_args(argv)
    FORMATS.get(ns.format)  # an unknown format fails before the source is read
    module: Any = importlib.import_module(DATASETS[ns.dataset])
    source = module.open_source(ns)
    counts = source.counts()
    dest = prepare(source, ns.out, ns.format, ns.force)
    shown = ", ".join(f"{split} {n}" for split, n in counts.items())
    print(f"[prepare] wrote {dest}/ ({shown} samples, format {ns.format})")
