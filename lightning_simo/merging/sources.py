"""What a merge starts from: θ0, each task's fine-tuned encoder and head, and their hashes.

The MergeCallback and the analysis both read the same single-task checkpoints; they do it here,
once, with one set of checks and one set of messages (a missing checkpoint, a checkpoint without
its task's head, an encoder fine-tuned from another backbone, a head of another shape). Loading
goes through :func:`lightning_simo.checkpoints.load_state_dict` (data only, never code).

>>> sources = load_sources({"depth": "depth.ckpt", "normals": "normals.ckpt"}, ["depth", "normals"],
...                        theta0="foundation.ckpt")
>>> merged = merge(sources.theta0, sources.finetuned, "ties")
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor, nn

from lightning_simo.checkpoints import (
    encoder_state_dict,
    file_sha256,
    head_state_dicts,
    load_state_dict,
)
from lightning_simo.merging.task_vectors import check_compatible

__all__ = [
    "Sources",
    "attach_heads",
    "check_encoders",
    "check_tasks",
    "load_sources",
    "sources_from_states",
    "state_dict_sha256",
]

StateDict = Mapping[str, Tensor]


def state_dict_sha256(state: StateDict) -> str:
    """SHA-256 of a state dict's keys, dtypes, shapes and bytes (θ0 held in memory has no file)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        value = state[key].detach().cpu().contiguous()
        digest.update(f"{key}\x00{value.dtype}\x00{tuple(value.shape)}\x00".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_tasks(tasks: Sequence[str], given: Mapping[str, object]) -> None:
    """Every task needs its own single-task checkpoint."""
    missing = [t for t in tasks if t not in given]
    if missing:
        raise ValueError(
            f"No checkpoint given for task(s) {missing}; add them to merge.checkpoints "
            "({task: path}), one single-task checkpoint per task."
        )


def check_encoders(
    theta0: StateDict, encoders: Mapping[str, StateDict], theta0_name: str = "pretrained encoder"
) -> None:
    """Refuse encoders that were not fine-tuned from θ0's architecture (``{label: state}``)."""
    try:
        check_compatible(
            theta0,
            list(encoders.values()),
            names=list(encoders),
            reference_name=theta0_name,
        )
    except ValueError as err:
        raise ValueError(
            f"{err}. Merge only checkpoints fine-tuned from this model's encoder (same encoder "
            "settings: name, model_kwargs)."
        ) from None


def _check_heads(heads: Mapping[str, Mapping[str, StateDict]], origins: Mapping[str, str]) -> None:
    for task, found in heads.items():
        if task not in found:
            raise ValueError(
                f"{origins[task]} given for task {task!r} has no head for {task!r} (heads found: "
                f"{', '.join(sorted(found)) or 'none'}); pass the single-task checkpoint of "
                f"{task!r} (its full state dict)."
            )


def attach_heads(
    net: nn.Module, heads: Mapping[str, StateDict], origins: Mapping[str, str] | None = None
) -> None:
    """Load each task's fine-tuned head into ``net.heads[task]``."""
    for task, state in heads.items():
        origin = (origins or {}).get(task, f"the {task!r} checkpoint")
        try:
            net.heads[task].load_state_dict(state)
        except RuntimeError as err:
            detail = [line.strip() for line in str(err).splitlines() if line.strip()][-1]
            raise ValueError(
                f"The {task!r} head in {origin} does not fit this model's head (different class "
                f"count or head kind): {detail}"
            ) from None


@dataclass
class Sources:
    """θ0 and the single-task checkpoints of a merge, checked to fit together.

    ``states`` are the checkpoints as loaded (encoder and heads); ``encoders`` and ``heads`` are
    views of them (no copies). ``hashes`` identify each task's file (SHA-256; empty for states
    given in memory) and :attr:`identity` the whole set, for caches and resume checks.
    """

    tasks: tuple[str, ...]
    theta0: dict[str, Tensor]
    states: dict[str, dict[str, Tensor]]
    encoders: dict[str, dict[str, Tensor]]
    heads: dict[str, dict[str, Tensor]]
    origins: dict[str, str]
    paths: dict[str, str] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)
    theta0_hash: str | None = None

    @property
    def finetuned(self) -> list[dict[str, Tensor]]:
        """The fine-tuned encoders in task order (what merge methods take)."""
        return [self.encoders[t] for t in self.tasks]

    @cached_property
    def identity(self) -> dict[str, str]:
        """Content hashes of θ0 and of every task's source (files hashed once, θ0 in memory)."""
        hashes = {t: self.hashes.get(t) or state_dict_sha256(self.encoders[t]) for t in self.tasks}
        return {"theta0": self.theta0_hash or state_dict_sha256(self.theta0), **hashes}

    def attach_heads(self, net: nn.Module) -> None:
        attach_heads(net, self.heads, self.origins)


def sources_from_states(
    tasks: Sequence[str],
    theta0: StateDict,
    states: Mapping[str, StateDict],
    origins: Mapping[str, str] | None = None,
    theta0_name: str = "pretrained encoder",
) -> Sources:
    """:class:`Sources` from checkpoints already in memory (``{task: full state dict}``)."""
    check_tasks(tasks, states)
    origins = {t: (origins or {}).get(t, f"the {t!r} checkpoint") for t in tasks}
    base = encoder_state_dict(theta0)
    chosen = {t: dict(states[t]) for t in tasks}
    all_heads = {t: head_state_dicts(chosen[t]) for t in tasks}
    _check_heads(all_heads, origins)
    encoders = {t: encoder_state_dict(chosen[t]) for t in tasks}
    # the encoder first: another backbone also changes the heads' shapes, but is the cause
    check_encoders(base, {origins[t]: encoders[t] for t in tasks}, theta0_name)
    return Sources(
        tasks=tuple(tasks),
        theta0=base,
        states=chosen,
        encoders=encoders,
        heads={t: all_heads[t][t] for t in tasks},
        origins=origins,
    )


def load_sources(
    checkpoints: Mapping[str, str | os.PathLike[str]],
    tasks: Sequence[str],
    theta0: StateDict | str | os.PathLike[str],
) -> Sources:
    """Read and check θ0 (a path, or a state dict such as the module's own encoder) and one
    single-task checkpoint per task."""
    check_tasks(tasks, checkpoints)
    theta0_hash, theta0_name = None, "pretrained encoder"
    if isinstance(theta0, (str, os.PathLike)):
        theta0_name = f"pretrained encoder {str(theta0)!r}"
        theta0_hash = file_sha256(theta0)
        theta0 = load_state_dict(theta0)
    paths = {t: str(checkpoints[t]) for t in tasks}
    states = {t: load_state_dict(paths[t]) for t in tasks}
    origins = {t: f"checkpoint {paths[t]!r}" for t in tasks}
    sources = sources_from_states(tasks, theta0, states, origins, theta0_name)
    sources.paths = paths
    sources.hashes = {t: file_sha256(paths[t]) for t in tasks}
    sources.theta0_hash = theta0_hash
    return sources
