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


def _refusal_reason(message: str) -> str:
    """Pull torch's one-line reason (e.g. the unsupported global) out of its long message."""
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    if match:
        return f"it needs the global {match.group(1)}"
    match = re.search(r"WeightsUnpickler error: ([^\n]+)", message)
    if match:
        return match.group(1).strip().rstrip(".")
    return "it holds objects other than tensors and plain containers"


def _read_file(path: Path) -> Any:
    """Deserialize ``path`` without ever executing code stored in it."""
    if not path.exists():
        raise CheckpointError(
            f"checkpoint not found: {path} (check the path, or run the stage that produces it)"
        )
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint path is a directory, not a file: {path} (point to the .ckpt/.pt/"
            ".safetensors file inside it)"
        )
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        message = str(err)
        if "Weights only load failed" in message:
            raise CheckpointError(
                f"refused to load {path}: it contains pickled code/objects "
                f"({_refusal_reason(message)}), which were not executed; re-save it as a plain "
                "state dict (torch.save(model.state_dict(), ...)) or as .safetensors"
            ) from None
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupt file: {err})"
        ) from None
    except Exception as err:  # corrupt archives surface as RuntimeError, EOFError, KeyError...
        detail = str(err).split("\n", 1)[0].strip() or type(err).__name__
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupt file: {detail})"
        ) from None


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
            f"{path} holds a {type(obj).__name__}, not a state dict (expected a dict of tensors)"
        )
    for key in _NESTED_KEYS:
        nested = obj.get(key)
        if isinstance(nested, Mapping):
            return _tensors_only(nested)
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        return {str(k): v for k, v in obj.items()}
    shown = ", ".join(repr(k) for k in list(obj)[:8])
    raise CheckpointError(
        f"{path} has no state dict: expected a Lightning checkpoint ('state_dict' key), a 'model' "
        f"entry or a dict of tensors, found keys [{shown}]"
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


def save_state_dict_atomic(state_dict: Mapping[str, Tensor], path: str | os.PathLike[str]) -> None:
    """Write ``state_dict`` to ``path`` so that ``path`` is either the old file or complete.

    ``.safetensors`` paths are written with ``safetensors``, anything else with ``torch.save``.
    :func:`lightning_simo.io.atomic_write` provides the temporary file in the same folder and the
    final ``os.replace``; the data is flushed to disk before the rename so a power loss cannot
    leave a renamed but empty file.
    """
    target = Path(path)

    def write(tmp: Path) -> None:
        if _is_safetensors(target):
            from safetensors.torch import save_file

            save_file(_safetensors_ready(state_dict), str(tmp))
        else:
            torch.save(dict(state_dict), tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())

    atomic_write(target, write)


def file_sha256(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks so multi-GB checkpoints never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
