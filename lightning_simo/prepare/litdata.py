"""``lightning_simo prepare --format litdata``: write a datamodule's splits for streaming.

Takes any config with a ``data:`` section (the one a ``fit`` run uses), builds that datamodule
and writes its splits, un-augmented, as litdata optimized datasets under ``--out`` (a folder or
an object-store URL), ready for :class:`~lightning_simo.data.streaming.StreamingDenseDataModule`::

    lightning_simo prepare --format litdata --config configs/taskonomy_single_task.yaml \\
        --out s3://my-bucket/taskonomy-litdata --num_workers 16
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser

from lightning_simo.data.base import SPLITS, DenseDataModule
from lightning_simo.data.streaming import write_litdata

__all__ = ["FORMATS", "build_parser", "datamodule_from_config", "main"]

FORMATS = ("litdata",)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="lightning_simo prepare",
        description="Write a datamodule's splits in a streaming format (litdata).",
        default_config_files=[],
    )
    parser.add_argument("--format", choices=FORMATS, required=True, help="output format")
    parser.add_argument("--config", required=True, help="a config with a `data:` section")
    parser.add_argument("--out", required=True, help="output folder or URL (s3://...)")
    parser.add_argument("--splits", type=list[str], default=list(SPLITS), help="splits to write")
    parser.add_argument("--chunk_bytes", default="64MB", help="litdata chunk size")
    parser.add_argument("--num_workers", type=int, default=1, help="litdata writer processes")
    parser.add_argument(
        "--start_method", default=None, help="how litdata starts writers (fork, spawn)"
    )
    return parser


def datamodule_from_config(path: str | Path) -> DenseDataModule:
    """The datamodule a config's ``data:`` section describes, built as LightningCLI would."""
    config_path = Path(path)
    if not config_path.is_file():
        raise FileNotFoundError(f"config not found: {config_path}")
    section: Any = (yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}).get("data")
    if not isinstance(section, dict) or "class_path" not in section:
        raise ValueError(f"{config_path} has no `data:` section with a class_path")
    parser = ArgumentParser()
    parser.add_subclass_arguments(DenseDataModule, "data")
    return parser.instantiate_classes(parser.parse_object({"data": section})).data


def main(args: list[str] | None = None) -> None:
    options = build_parser().parse_args(sys.argv[1:] if args is None else list(args))
    datamodule = datamodule_from_config(options.config)
    counts = write_litdata(
        datamodule,
        options.out,
        options.splits,
        options.chunk_bytes,
        options.num_workers,
        options.start_method,
    )
    written = ", ".join(f"{split}: {n}" for split, n in counts.items())
    print(f"[prepare] {type(datamodule).__name__} -> {options.out} (litdata; {written} samples)")
