"""Safe checkpoint input/output: checkpoints are data, never code.

Merging reads checkpoints that other people (or other stages) produced, so every load goes through
``safetensors`` or ``torch.load(..., weights_only=True)``: a pickle that would need to import or
call anything is refused before any of its code runs. Writes are atomic (temporary file in the same
folder, then ``os.replace``) so an interrupted save never leaves a file that looks complete.

The key helpers know where this project keeps its modules: the encoder (``backbone`` = the timm
model, ``adapters`` = optional re-alignment adapters) lives at ``net.encoder.`` inside
``SIMOModule`` / ``JointMTLModule`` and at ``encoder.`` inside ``FoundationModule``; task heads
live at ``net.heads.<task>.``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_simo.io import atomic_write

__all__ = [
    "CheckpointError",
    "encoder_state_dict",
    "extract_prefix",
    "file_sha256",
    "head_state_dicts",
    "load_state_dict",
    "read_checkpoint",
    "save_state_dict_atomic",
]

_ENCODER_MARK = "encoder.backbone."
_ENCODER_ATTRS = ("backbone.", "adapters.")
_HEAD_PREFIXES = ("net.heads.", "heads.")
# Keys that may hold the weights inside a checkpoint dict, in order of preference.
_NESTED_KEYS = ("state_dict", "model")


class CheckpointError(ValueError):
    """A checkpoint file could not be used; the message names the file and what to do next."""


def _is_safetensors(path: Path) -> bool:
    return path.suffix == ".safetensors"


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
_PICKLE_PROTO = b"\x80"  # torch.save's legacy format starts with a pickle protocol opcode
_CODE_MARKS = ("Unsupported global", "Unsupported class", "Trying to call", "Unsupported operand")


def _refusal_reason(message: str) -> str:
    """Pull torch's one-line reason (e.g. the unsupported global) out of its long message."""
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    if match:
        return f"it needs the global {match.group(1)}"
    match = re.search(r"WeightsUnpickler error: ([^\n]+)", message)
    if match:
        return match.group(1).strip().rstrip(".")
    return "it holds objects other than tensors and plain containers"


def _first_line(err: BaseException) -> str:
    """The first sentence of ``err``'s message (torch's go on for a paragraph)."""
    line = str(err).split("\n", 1)[0].strip()
    return line.split(". ", 1)[0].rstrip(".") or type(err).__name__


def _unreadable(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: not a readable checkpoint: {what} (rerun the stage that produces it, or copy "
        "the file again)"
    )


def _looks_like_safetensors(head: bytes) -> bool:
    """safetensors: an 8-byte little-endian header length, then the JSON header."""
    return len(head) > 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 28


def _foreign_format(path: Path, head: bytes) -> CheckpointError:
    """The diagnosis for a file that is neither a torch file nor safetensors."""
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        return CheckpointError(
            f"{path}: not a checkpoint: neither a torch file nor safetensors (random or foreign "
            f"bytes, starting {head[:8]!r}) (point to a .ckpt / .pt / .safetensors file written "
            "by lightning_simo, torch.save or safetensors)"
        )
    return CheckpointError(
        f"{path}: a JSON file, not a checkpoint (point to the .ckpt / .pt / .safetensors file; "
        "test_metrics.json files belong in model.reference_metrics)"
    )


def _read_file(path: Path) -> Any:
    """Deserialize ``path`` without ever executing code stored in it.

    Every way a file can be unusable gets its own diagnosis (missing, empty, JSON, foreign bytes,
    truncated archive, pickled code), so the one line a user reads says what the file really is.
    """
    if not path.exists():
        raise CheckpointError(
            f"{path}: checkpoint not found (check the path, or run the stage that produces it)"
        )
    if path.is_dir():
        raise CheckpointError(
            f"{path}: is a directory, not a checkpoint file (point to the .ckpt/.pt/"
            ".safetensors file inside it)"
        )
    with open(path, "rb") as handle:
        head = handle.read(16)
    if not head:
        raise _unreadable(path, "empty file (0 bytes; the run writing it was probably killed)")
    if _is_safetensors(path) or _looks_like_safetensors(head):
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:
            detail = f"truncated or corrupt safetensors file: {_first_line(err)}"
            raise _unreadable(path, detail) from None
    if not head.startswith((_ZIP_MAGIC, _PICKLE_PROTO)):
        raise _foreign_format(path, head)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        message = str(err)
        if "Weights only load failed" in message and any(m in message for m in _CODE_MARKS):
            raise CheckpointError(
                f"{path}: refused: it contains pickled code/objects ({_refusal_reason(message)}), "
                "which were not executed (re-save it as a plain state dict with "
                "torch.save(model.state_dict(), ...) or as .safetensors)"
            ) from None
        detail = _refusal_reason(message) if "WeightsUnpickler" in message else _first_line(err)
        raise _unreadable(path, f"truncated or corrupt torch file: {detail}") from None
    except Exception as err:  # corrupt archives surface as RuntimeError, EOFError, KeyError...
        raise _unreadable(path, f"truncated or corrupt torch file: {_first_line(err)}") from None


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A Lightning checkpoint of this suite, read as data and checked before Lightning uses it.

    ``--ckpt_path`` files go through here before Lightning reads their hyper-parameters or
    restores them, so a bad file is one :class:`CheckpointError` instead of a traceback.
    """
    path = Path(path)
    obj = _read_file(path)
    lightning_keys = ("state_dict", "pytorch-lightning_version")
    if not isinstance(obj, Mapping) or not all(k in obj for k in lightning_keys):
        kind = "a plain state dict" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise CheckpointError(
            f"{path}: {kind}, not a Lightning checkpoint (no 'state_dict' and version) (give a "
            "checkpoint written by `lightning_simo fit`; plain weights go in "
            "--model.init_from or --model.encoder.checkpoint)"
        )
    return dict(obj)


def _tensors_only(mapping: Mapping[Any, Any]) -> dict[str, Tensor]:
    return {str(k): v for k, v in mapping.items() if isinstance(v, Tensor)}


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Load the weights stored in ``path`` as a flat ``{name: tensor}`` dict on the CPU.

    Accepts ``.safetensors`` files, Lightning checkpoints (the ``"state_dict"`` entry is used and
    its non-tensor entries are dropped), dicts that keep the weights under ``"model"``, and plain
    state dicts. Anything else raises :class:`CheckpointError` with a one-line explanation.
    """
    path = Path(path)
    obj = _read_file(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a state dict (give a checkpoint that "
            "holds a dict of tensors)"
        )
    for key in _NESTED_KEYS:
        nested = obj.get(key)
        if isinstance(nested, Mapping):
            return _tensors_only(nested)
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        return {str(k): v for k, v in obj.items()}
    shown = ", ".join(repr(k) for k in list(obj)[:8])
    raise CheckpointError(
        f"{path}: has no state dict, found keys [{shown}] (give a Lightning checkpoint "
        "('state_dict' key), a dict with a 'model' entry or a dict of tensors)"
    )


def extract_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Entries whose key starts with ``prefix``, with the prefix stripped (submodule weights)."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def encoder_state_dict(
    state_dict: Mapping[str, Tensor], include_adapters: bool = False
) -> dict[str, Tensor]:
    """The encoder's weights, keyed like ``lightning_simo.models.encoders.Encoder`` expects.

    Works on a checkpoint of any module of this project and on a raw timm state dict, so
    the pretrained encoder and the fine-tuned ones can be compared key by key:

    * keys containing ``"encoder.backbone."``: the entries under the first such ``<...>encoder.``
      prefix (e.g. ``net.encoder.``), prefix stripped, so keys start with ``backbone.``;
    * keys that already start with ``backbone.`` / ``adapters.`` (an ``Encoder``'s own state
      dict): used as they are;
    * otherwise (raw timm): every key gets the ``backbone.`` prefix.

    Adapter weights (``adapters.``) are dropped unless ``include_adapters``: they are added by
    re-alignment, are not part of any task vector, and would make encoders incompatible.
    """
    first = next((k for k in state_dict if _ENCODER_MARK in k), None)
    if first is not None:
        prefix = first[: first.index(_ENCODER_MARK) + len("encoder.")]
        encoder = extract_prefix(state_dict, prefix)
    elif state_dict and all(k.startswith(_ENCODER_ATTRS) for k in state_dict):
        encoder = dict(state_dict)
    else:
        encoder = {"backbone." + k: v for k, v in state_dict.items()}
    if not include_adapters:
        encoder = {k: v for k, v in encoder.items() if not k.startswith("adapters.")}
    return encoder


def head_state_dicts(state_dict: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Per-task head weights ``{task: {name: tensor}}`` from ``net.heads.<task>.<name>`` keys.

    A bare ``SIMONet`` state dict (``heads.<task>.<name>``) is accepted too, so heads can be moved
    between a LightningModule checkpoint and a plain model.
    """
    for prefix in _HEAD_PREFIXES:
        heads = extract_prefix(state_dict, prefix)
        if heads:
            break
    result: dict[str, dict[str, Tensor]] = {}
    for key, value in heads.items():
        task, sep, rest = key.partition(".")
        if sep:
            result.setdefault(task, {})[rest] = value
    return result


def _safetensors_ready(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU tensors with no shared storage, as ``safetensors`` requires."""
    seen: set[int] = set()
    ready: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        tensor = value.detach().cpu()
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen or tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        ready[key] = tensor
    return ready


def _save_atomic(obj: Any, target: Path) -> None:
    """Serialise in memory, then write and fsync through Python's file API: a full disk or a
    file-size limit is then an ``OSError`` with its errno (torch's own writer reports it as an
    opaque RuntimeError), which :func:`~lightning_simo.io.atomic_write` turns into one line."""
    if _is_safetensors(target):
        from safetensors.torch import save

        data: bytes | memoryview = save(_safetensors_ready(obj))
    else:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        data = buffer.getbuffer()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    atomic_write(target, write)


def save_state_dict_atomic(state_dict: Mapping[str, Tensor], path: str | os.PathLike[str]) -> None:
    """Write ``state_dict`` to ``path`` so that ``path`` is either the old file or complete.

    ``.safetensors`` paths are written with ``safetensors``, anything else with ``torch.save``.
    :func:`lightning_simo.io.atomic_write` provides the temporary file in the same folder and the
    final ``os.replace``; the data is flushed to disk before the rename so a power loss cannot
    leave a renamed but empty file.
    """
    _save_atomic(dict(state_dict), Path(path))


def file_sha256(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks so multi-GB checkpoints never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
