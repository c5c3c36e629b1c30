"""Lazy merging: inputs read from safetensors one tensor (or one row block) at a time.

Twenty ViT-g checkpoints do not fit in RAM together, and no merge method needs them to: the
engine (:mod:`lightning_simo.merging.methods`) works key by key through ``Mapping`` accessors.
:class:`LazyStateDict` is such a mapping over ``safetensors.safe_open`` (a single file, or the
Hugging Face sharded layout with ``model.safetensors.index.json``); a tensor is read when the
method asks for it and dropped when the method is done with it. Its ``metadata()`` (shapes and
dtypes from the file headers) lets the engine check compatibility without reading any data.

:func:`merge_lazily` streams ``(key, merged tensor)`` pairs. For methods declared
``elementwise`` (average, task arithmetic, globally trimmed TIES) large tensors are also split
into row blocks of about ``chunk_numel`` coordinates, so the working set is ``(tasks + 2)``
blocks whatever the model; results equal the in-memory :func:`~lightning_simo.merging.merge`
bit for bit, because every coordinate goes through the same float operations and global
statistics (TIES's thresholds and majority sign) see the same multiset of values. A ``device``
moves each block to an accelerator for the arithmetic and brings results back to the CPU.

Layout conventions follow Hugging Face (index ``{"metadata": {"total_size"}, "weight_map":
{key: shard}}``), as FusionBench's lazy state dict and mergekit's loader read them.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_simo.checkpoints import CheckpointError, load_state_dict
from lightning_simo.merging.methods import (
    MERGE_METHODS,
    _select_keys,
    iter_merge,
    tensor_metadata,
)

__all__ = [
    "DEFAULT_CHUNK_NUMEL",
    "INDEX_NAME",
    "LazyStateDict",
    "StateDictView",
    "merge_lazily",
    "open_state_dict",
    "source_files",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_CHUNK_NUMEL = 1 << 20
"""Row blocks of about 1 M coordinates (4 MB in float32): large enough that per-block overhead
is negligible, small enough that ``tasks + 2`` blocks are a rounding error next to the output."""


def _torch_dtype(name: str, path: Path, key: str) -> torch.dtype:
    from safetensors.torch import _TYPES

    try:
        return _TYPES[name]
    except KeyError:
        raise CheckpointError(
            f"{path}: tensor {key!r} has dtype {name}, which this torch build cannot hold"
        ) from None


def _read_index(index: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{index} is not a safetensors index (expected JSON with a 'weight_map' of "
            f"{{tensor: shard file}}): {err}"
        ) from None
    shards = {name: index.parent / name for name in sorted(set(weight_map.values()))}
    missing = [str(path) for path in shards.values() if not path.is_file()]
    if missing:
        raise CheckpointError(
            f"{index} names shard(s) that do not exist: {', '.join(missing)} (copy the complete "
            "checkpoint folder)"
        )
    return {key: shards[name] for key, name in weight_map.items()}


def source_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files that make up the checkpoint at ``path`` (index first for a sharded one)."""
    path = Path(path)
    if path.is_dir():
        if (path / INDEX_NAME).is_file():
            path = path / INDEX_NAME
        elif (path / SINGLE_NAME).is_file():
            return [path / SINGLE_NAME]
        else:
            raise CheckpointError(
                f"{path} is a folder without {INDEX_NAME} or {SINGLE_NAME} (point to a "
                "checkpoint file or a Hugging Face style safetensors folder)"
            )
    if path.name.endswith(".index.json"):
        if not path.is_file():
            raise CheckpointError(f"safetensors index not found: {path}")
        return [path, *sorted(set(_read_index(path).values()))]
    return [path]


class _TensorFile:
    """One safetensors file: validated by ``safe_open``, then read with positional reads.

    ``safe_open`` memory-maps the file, and every page a read touches stays in the process's
    resident set until the mapping is closed, so reading N checkpoints through it grows RSS
    by N models even though each tensor is dropped at once. Positional reads (``os.pread``) of
    the byte range the header names keep exactly the copied tensor, nothing else.
    """

    def __init__(self, path: Path) -> None:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:  # checks sizes
                self.metadata = dict(handle.metadata() or {})
            with open(path, "rb") as raw:
                (length,) = struct.unpack("<Q", raw.read(8))
                header = json.loads(raw.read(length))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(
                f"{path} is not a readable safetensors file (truncated or corrupt: {err})"
            ) from None
        header.pop("__metadata__", None)
        self.path = path
        self.start = 8 + length
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        for key, entry in header.items():
            dtype = _torch_dtype(entry["dtype"], path, key)
            self.entries[key] = (dtype, tuple(entry["shape"]), entry["data_offsets"][0])
        self._fd = os.open(path, os.O_RDONLY)

    def read(self, key: str, start: int | None = None, stop: int | None = None) -> Tensor:
        dtype, shape, offset = self.entries[key]
        if start is not None and shape:
            row = math.prod(shape[1:]) * dtype.itemsize
            offset, shape = offset + start * row, (stop - start, *shape[1:])
        count = math.prod(shape) * dtype.itemsize
        data = torch.empty(count, dtype=torch.uint8)
        if count and os.preadv(self._fd, [data.numpy()], self.start + offset) != count:
            raise CheckpointError(f"{self.path} ended while reading {key!r} (truncated file)")
        return data.view(dtype).reshape(shape)

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)


class _Described(Mapping[str, Tensor]):
    """A mapping whose keys, shapes and dtypes are known up front (``self._meta``)."""

    _meta: dict[str, Tensor]

    def metadata(self) -> Mapping[str, Tensor]:
        """Meta-device tensors with every key's shape and dtype (no data read)."""
        return self._meta

    def __iter__(self) -> Iterator[str]:
        return iter(self._meta)

    def __len__(self) -> int:
        return len(self._meta)

    def __contains__(self, key: object) -> bool:
        return key in self._meta


class LazyStateDict(_Described):
    """A read-only ``{key: tensor}`` over safetensors file(s); data is read on access.

    ``path``: a ``.safetensors`` file, a ``*.index.json`` of a sharded checkpoint, or a folder
    holding either ``model.safetensors.index.json`` or ``model.safetensors``. Every file is
    opened (and its header validated, which catches truncated shards) on construction.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        files = source_files(self.path)
        if files[0].name.endswith(".index.json"):
            locations = _read_index(files[0])
            shards = files[1:]
        else:
            if not files[0].is_file():
                raise CheckpointError(
                    f"checkpoint not found: {files[0]} (check the path, or run the stage that "
                    "produces it)"
                )
            locations, shards = {}, files
        self._files = [_TensorFile(shard) for shard in shards]
        self._where: dict[str, _TensorFile] = {}
        self._meta: dict[str, Tensor] = {}
        for file in self._files:
            for key, (dtype, shape, _) in sorted(file.entries.items(), key=lambda e: e[1][2]):
                if locations and locations.get(key) != file.path:
                    continue
                self._meta[key] = torch.empty(shape, dtype=dtype, device="meta")
                self._where[key] = file
        absent = next((k for k in locations if k not in self._where), None)
        if absent is not None:
            raise CheckpointError(
                f"{self.path}: the index places {absent!r} in {locations[absent].name}, which "
                "does not hold it (re-export the checkpoint)"
            )

    def file_metadata(self) -> dict[str, str]:
        """The ``__metadata__`` of the first file (sharded writers repeat it in every shard)."""
        return dict(self._files[0].metadata)

    def __getitem__(self, key: str) -> Tensor:
        return self._where[key].read(key)

    def read_rows(self, key: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of ``key`` (only those bytes are read from the file)."""
        return self._where[key].read(key, start, stop)


def open_state_dict(path: str | os.PathLike[str]) -> Mapping[str, Tensor]:
    """Safetensors (file, index or folder) lazily; any other checkpoint loaded whole, as data."""
    target = Path(path)
    if target.is_dir() or target.suffix == ".safetensors" or target.name.endswith(".index.json"):
        return LazyStateDict(target)
    return load_state_dict(target)


def _meta_of(source: Mapping[str, Tensor], key: str) -> Tensor:
    return tensor_metadata(source)[key]


class StateDictView(_Described):
    """Keys of another state dict, renamed, optionally split into row blocks, moved to a device.

    ``plan`` maps each view key to ``(source key, rows)`` where ``rows`` is ``None`` (the whole
    tensor) or ``(start, stop)``. Reading goes through the source's ``read_rows`` when it has
    one (a :class:`LazyStateDict` then copies only those rows out of the file).
    """

    def __init__(
        self,
        source: Mapping[str, Tensor],
        plan: Mapping[str, tuple[str, tuple[int, int] | None]],
        device: str | torch.device = "cpu",
        trimmer: _HeapTrimmer | None = None,
    ) -> None:
        self.source = source
        self.plan = dict(plan)
        self.device = torch.device(device)
        self.trimmer = trimmer
        self._meta: dict[str, Tensor] = {}
        for key, (name, rows) in self.plan.items():
            ref = _meta_of(source, name)
            shape = ref.shape if rows is None else (rows[1] - rows[0], *ref.shape[1:])
            self._meta[key] = torch.empty(shape, dtype=ref.dtype, device="meta")

    @classmethod
    def renamed(
        cls,
        source: Mapping[str, Tensor],
        names: Mapping[str, str],
        device: str | torch.device = "cpu",
    ) -> StateDictView:
        """``{new key: source key}`` as a view (e.g. the encoder part of a checkpoint)."""
        return cls(source, {new: (old, None) for new, old in names.items()}, device)

    def __getitem__(self, key: str) -> Tensor:
        name, rows = self.plan[key]
        if rows is None:
            value = self.source[name]
        elif hasattr(self.source, "read_rows"):
            value = self.source.read_rows(name, *rows)
        else:
            value = self.source[name][rows[0] : rows[1]]
        if self.trimmer is not None:
            self.trimmer.count(value.numel() * value.element_size())
        return value.to(self.device)


class _HeapTrimmer:
    """Give freed heap memory back to the OS every ``interval`` bytes read (glibc only).

    A merge frees temporaries of many sizes between long-lived results; glibc keeps the holes
    in its heap, so the resident set creeps towards the sum of everything ever allocated.
    ``malloc_trim`` returns free pages wherever they are; where it does not exist, nothing
    happens.
    """

    def __init__(self, interval: int = 256 << 20) -> None:
        self.interval = interval
        self.pending = 0
        try:
            import ctypes

            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            self._trim = None

    def count(self, nbytes: int) -> None:
        self.pending += nbytes
        if self.pending >= self.interval and self._trim is not None:
            self._trim(0)
            self.pending = 0


_BLOCK_MARK = "\x1f"  # cannot appear in a module path, so block keys never clash with real keys


def _row_plan(
    meta: Mapping[str, Tensor], split: set[str], chunk_numel: int | None
) -> dict[str, tuple[str, tuple[int, int] | None]]:
    plan: dict[str, tuple[str, tuple[int, int] | None]] = {}
    for key, ref in meta.items():
        if chunk_numel is None or key not in split or ref.dim() == 0 or ref.numel() <= chunk_numel:
            plan[key] = (key, None)
            continue
        rows = ref.shape[0]
        step = max(1, chunk_numel // max(1, ref.numel() // rows))
        for start in range(0, rows, step):
            plan[f"{key}{_BLOCK_MARK}{start}"] = (key, (start, min(rows, start + step)))
    return plan


def merge_lazily(
    pretrained: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    method: str,
    *,
    device: str | torch.device = "cpu",
    chunk_numel: int | None = DEFAULT_CHUNK_NUMEL,
    **options: Any,
) -> Iterator[tuple[str, Tensor]]:
    """Stream ``(key, merged tensor on the CPU)`` in ``pretrained``'s order.

    Inputs are any state dicts (typically :class:`LazyStateDict` or views of them); the values
    equal ``merge(pretrained, finetuned, method, **options)`` bit for bit on the same device.
    ``chunk_numel=None`` never splits tensors. Options are validated before the first value.
    """
    if method not in MERGE_METHODS:
        iter_merge(pretrained, finetuned, method, **options)  # raises the engine's message
    spec = MERGE_METHODS[method]
    common = {k: options[k] for k in ("bn_stats", "keys") if k in options}
    method_options = {k: v for k, v in options.items() if k not in common}
    meta = tensor_metadata(pretrained)
    split: set[str] = set()
    if chunk_numel is not None and spec.is_elementwise(spec.normalise(method_options)):
        split = set(_select_keys(meta, common.get("keys"), common.get("bn_stats", "merge")))
    plan = _row_plan(meta, split, chunk_numel)
    trimmer = _HeapTrimmer()
    views = [StateDictView(sd, plan, device, trimmer) for sd in (pretrained, *finetuned)]
    if split:
        # the merge keys, resolved on real names above, in block form
        common = {"bn_stats": "merge", "keys": [k for k, (n, _) in plan.items() if n in split]}
    stream = iter_merge(views[0], views[1:], method, **common, **method_options)
    return _reassemble(stream, plan)


def _reassemble(
    stream: Iterator[tuple[str, Tensor]], plan: Mapping[str, tuple[str, tuple[int, int] | None]]
) -> Iterator[tuple[str, Tensor]]:
    """Join each split tensor's row blocks (which arrive consecutively) back into one."""
    last_row = {name: rows[1] for name, rows in plan.values() if rows is not None}
    blocks: list[Tensor] = []
    for key, value in stream:
        name, rows = plan[key]
        if rows is None:
            yield name, value.cpu()
            continue
        blocks.append(value.cpu())
        if rows[1] == last_row[name]:
            yield name, torch.cat(blocks) if len(blocks) > 1 else blocks[0]
            blocks = []
