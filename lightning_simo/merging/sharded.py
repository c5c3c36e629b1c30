"""Sharded safetensors output, written as tensors arrive, all or nothing.

A merged ViT-g does not need to sit in memory before it is saved: :class:`ShardedWriter` keeps
tensors only until the current shard reaches ``max_shard_size``, then saves that shard with
``safetensors`` and forgets it (mergekit's writer works the same way). The result follows the
Hugging Face layout: one ``model.safetensors`` when everything fits in one shard, otherwise
``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``. Everything is
written inside a hidden temporary folder next to the destination and moved into place only when
complete, so an error (or Ctrl-C) never leaves a folder that looks like a finished checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType

from torch import Tensor

from lightning_simo.checkpoints import _safetensors_ready
from lightning_simo.io import _current_umask, atomic_write_text, ensure_writable_dir
from lightning_simo.merging.lazy import INDEX_NAME, SINGLE_NAME

__all__ = ["DEFAULT_MAX_SHARD_SIZE", "ShardedWriter", "parse_size", "write_sharded"]

DEFAULT_MAX_SHARD_SIZE = "5GB"
"""Hugging Face's default shard size for ``save_pretrained``."""

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or ``"500MB"``, ``"5GB"``, ``"2GiB"`` (HF's units)."""
    if isinstance(size, int) and not isinstance(size, bool):
        number, unit = size, ""
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        if match is None or match.group(2).upper() not in _UNITS:
            raise ValueError(
                f"max_shard_size must be a number of bytes or a size like '500MB', '5GB', "
                f"'2GiB', got {size!r}"
            )
        number, unit = float(match.group(1)), match.group(2).upper()
    value = int(number * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"max_shard_size must be > 0, got {size!r}")
    return value


class ShardedWriter:
    """Context manager: ``add(key, tensor)`` in output order; the folder appears on exit.

    ``folder`` must not exist yet (or be empty): a merge never overwrites a checkpoint silently.
    ``metadata`` (str to str) goes into every shard's ``__metadata__`` and the index.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.max_bytes = parse_size(max_shard_size)
        self.metadata = dict(metadata or {})
        if self.folder.exists() and (not self.folder.is_dir() or any(self.folder.iterdir())):
            raise ValueError(
                f"output {self.folder} already exists; remove it or choose another output folder"
            )
        self._tmp: Path | None = None
        self._shard: dict[str, Tensor] = {}
        self._shard_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def __enter__(self) -> ShardedWriter:
        parent = ensure_writable_dir(self.folder.parent)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}.", dir=parent))
        return self

    def add(self, key: str, tensor: Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._shard and self._shard_bytes + size > self.max_bytes:
            self._flush()
        self._shard[key] = tensor
        self._shard_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        assert self._tmp is not None, "use ShardedWriter as a context manager"
        index = len(self._shards)
        save_file(_safetensors_ready(self._shard), str(self._tmp / f"shard-{index}"), self.metadata)
        self._shards.append(list(self._shard))
        self._shard, self._shard_bytes = {}, 0

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._tmp is not None
        try:
            if kind is None:
                self._finish()
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _finish(self) -> None:
        assert self._tmp is not None
        if self._shard or not self._shards:
            self._flush()
        count = len(self._shards)
        names = (
            [SINGLE_NAME]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        for i, name in enumerate(names):
            with open(self._tmp / f"shard-{i}", "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(self._tmp / f"shard-{i}", self._tmp / name)
        if count > 1:
            weight_map = {key: name for name, keys in zip(names, self._shards) for key in keys}
            index = {
                "metadata": {"total_size": self.total_bytes, **self.metadata},
                "weight_map": weight_map,
            }
            atomic_write_text(self._tmp / INDEX_NAME, json.dumps(index, indent=2) + "\n")
        os.chmod(self._tmp, 0o777 & ~_current_umask())  # mkdtemp's 0700 would hide it
        os.replace(self._tmp, self.folder)  # rename(2) also replaces an empty folder

    @property
    def files(self) -> list[Path]:
        count = len(self._shards)
        if count == 1:
            return [self.folder / SINGLE_NAME]
        shards = [
            self.folder / f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)
        ]
        return [self.folder / INDEX_NAME, *shards]


def write_sharded(
    items: Iterable[tuple[str, Tensor]],
    folder: str | os.PathLike[str],
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write ``(key, tensor)`` pairs (e.g. :func:`~lightning_simo.merging.lazy.merge_lazily`'s
    stream) as a sharded safetensors folder; returns the files written."""
    with ShardedWriter(folder, max_shard_size, metadata) as writer:
        for key, tensor in items:
            writer.add(key, tensor)
    return writer.files
