"""``lightning_simo merge --config merge.yaml``: merge checkpoints into a model file, no training.

For merging many or large checkpoints outside a training run: the sources are opened lazily
(:mod:`lightning_simo.merging.lazy`), merged tensor by tensor (optionally on a GPU) and written
as sharded safetensors (:mod:`lightning_simo.merging.sharded`) holding the merged encoder and
every task's fine-tuned head, in ``SIMONet`` layout (``encoder.backbone.*``,
``heads.<task>.*``): ``--model.init_from <output>/model.safetensors`` tests it. The output's
metadata records the method, its options and the SHA-256 of every source, so a merged file can
always be traced back to what produced it.

```yaml
method: ties
options: {density: 0.2, scaling: 1.0}
pretrained: runs/foundation/checkpoints/last.ckpt   # θ0
sources: {segmentation: seg.safetensors, depth: depth/}   # file, index json, or HF folder
output: runs/merged/ties
max_shard_size: 5GB
device: cpu            # or cuda: the arithmetic runs there, tensor by tensor
```
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser
from torch import Tensor

from lightning_simo.checkpoints import encoder_state_dict, file_sha256, head_state_dicts
from lightning_simo.merging.lazy import (
    DEFAULT_CHUNK_NUMEL,
    StateDictView,
    merge_lazily,
    open_state_dict,
    source_files,
)
from lightning_simo.merging.sharded import DEFAULT_MAX_SHARD_SIZE, parse_size, write_sharded

__all__ = ["METADATA_KEY", "MergeSettings", "build_parser", "main", "run_merge", "source_sha256"]

METADATA_KEY = "lightning_simo.merge"
"""The ``__metadata__`` entry (JSON) that describes how an output was produced."""


@dataclasses.dataclass
class MergeSettings:
    """What to merge and where to write it.

    Args:
        sources: ``{task: checkpoint}``: Lightning checkpoints or safetensors (a file, a
            ``*.index.json`` or a Hugging Face style folder) of single-task models.
        pretrained: θ0, the checkpoint every source was fine-tuned from.
        output: the folder to create (``model.safetensors``, or shards plus an index).
        method: a registered merge method (``task_arithmetic``, ``ties``, ``dare``, ...).
        options: the method's options (``scaling``, ``density``, ...; ``bn_stats``, ``keys``).
        max_shard_size: largest output shard (``500MB``, ``5GB``, ``2GiB`` or bytes).
        device: where the arithmetic runs (``cpu``, ``cuda``, ``cuda:1``).
        chunk_numel: split larger tensors into row blocks of about this many coordinates
            (elementwise methods only; results are unchanged); ``null`` never splits.
        progress: show a progress bar over tensors.
    """

    sources: dict[str, str]
    pretrained: str
    output: str
    method: str = "task_arithmetic"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE
    device: str = "cpu"
    chunk_numel: int | None = DEFAULT_CHUNK_NUMEL
    progress: bool = True


def source_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a checkpoint; for a sharded one, of its files' names and digests in order."""
    files = source_files(path)
    if len(files) == 1:
        return file_sha256(files[0])
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def _key_names(state: Mapping[str, Tensor]) -> dict[str, str]:
    # the key rules of checkpoints.py applied to names only: values pass through untouched
    return encoder_state_dict({key: key for key in state})  # type: ignore[dict-item]


def _check_device(device: str) -> torch.device:
    try:
        target = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but no CUDA GPU is available; use 'cpu'")
    return target


def run_merge(settings: MergeSettings) -> list[Path]:
    """Merge as ``settings`` say; returns the files written. Every source is opened and checked
    (and the output folder found free) before anything is written."""
    if not settings.sources:
        raise ValueError("merge needs at least one source: set sources ({task: checkpoint})")
    device = _check_device(settings.device)
    parse_size(settings.max_shard_size)
    output = Path(settings.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(f"output {output} already exists; remove it or choose another folder")
    base = open_state_dict(settings.pretrained)
    theta0 = StateDictView.renamed(base, _key_names(base), device)
    finetuned, heads = [], {}
    for task, path in settings.sources.items():
        state = open_state_dict(path)
        names = head_state_dicts({key: key for key in state})  # type: ignore[dict-item]
        if task not in names:
            raise ValueError(
                f"source {path!r} given for task {task!r} has no head for it (heads found: "
                f"{', '.join(sorted(names)) or 'none'})"
            )
        finetuned.append(StateDictView.renamed(state, _key_names(state), device))
        heads[task] = StateDictView.renamed(state, names[task])
    stream = merge_lazily(
        theta0,
        finetuned,
        settings.method,
        chunk_numel=settings.chunk_numel,
        **settings.options,
    )  # validates method and options, and that every encoder matches θ0
    provenance = {
        "method": settings.method,
        "options": settings.options,
        "pretrained": {
            "path": str(settings.pretrained),
            "sha256": source_sha256(settings.pretrained),
        },
        "sources": {
            task: {"path": str(path), "sha256": source_sha256(path)}
            for task, path in settings.sources.items()
        },
    }
    total = len(theta0) + sum(len(head) for head in heads.values())
    items = _with_progress(_model_tensors(stream, heads), total, settings.progress)
    return write_sharded(
        items,
        output,
        settings.max_shard_size,
        metadata={METADATA_KEY: json.dumps(provenance, sort_keys=True)},
    )


def _model_tensors(
    encoder: Iterator[tuple[str, Tensor]], heads: Mapping[str, Mapping[str, Tensor]]
) -> Iterator[tuple[str, Tensor]]:
    for key, value in encoder:
        yield f"encoder.{key}", value
    for task, head in heads.items():
        for key in head:
            yield f"heads.{task}.{key}", head[key].detach().clone()


def _with_progress(
    items: Iterator[tuple[str, Tensor]], total: int, enabled: bool
) -> Iterator[tuple[str, Tensor]]:
    from tqdm.auto import tqdm

    with tqdm(total=total, unit="tensor", desc="merge", disable=not enabled) as bar:
        for item in items:
            yield item
            bar.update()


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="lightning_simo merge",
        description="Merge single-task checkpoints into one model (no training): lazily, tensor "
        "by tensor, into sharded safetensors.",
        default_config_files=[],
    )
    parser.add_argument("-c", "--config", action="config", help="A merge YAML.")
    parser.add_class_arguments(MergeSettings, nested_key=None, as_group=False)
    return parser


def main(args: list[str] | None = None) -> None:
    parser = build_parser()
    cfg = parser.parse_args(sys.argv[1:] if args is None else list(args))
    init = parser.instantiate_classes(cfg)
    fields = {f.name for f in dataclasses.fields(MergeSettings)}
    settings = MergeSettings(**{k: v for k, v in vars(init).items() if k in fields})
    files = run_merge(settings)
    print(f"[merge] {settings.method} of {len(settings.sources)} task(s) -> {files[0]}")
