"""The α search as a pure function, and a small JSON cache so that a repeated search is a lookup.

``search_scaling(score, grid)`` evaluates ``score(α)`` for each candidate and keeps the best (ties
go to the smaller α: the least departure from θ0). It knows nothing of Lightning: the
MergeCallback passes a closure that loads θ0 + α·τ into the model and evaluates it on the val
split; a notebook can pass anything.

What "best" means is the search criterion, :func:`search_score`, in one of the two Δ_MTL forms
of :mod:`lightning_simo.evaluation` (``SEARCH_METRICS``):

- ``"ratio"`` (default): the mean over tasks of the normalised performance ``m / b`` or ``b / m``
  of each task's primary metric, the form the SIMO paper's tables print;
- ``"difference"``: one plus the mean signed relative difference ``(-1)^l (m - b) / b`` (Eq. 2 of
  the SIMO paper, Maninis et al.), the quantity the SIMO authors' released code maximises when
  it picks α (the ``all`` entry of its evaluation, chosen by ``find_optimal_coef``).

Both read 1 at the single-task models' level, and they rank α alike near it; they part when an
error metric grows, since ``b / m`` saturates where ``(m - b) / b`` does not, so the difference
form punishes a doubled depth error twice as hard and may settle on another α.

The cache: a search's scores depend on the sources (θ0 and every fine-tuned checkpoint, by content
hash), the method and its options, and what the scores are measured on (split, batches, data);
:func:`search_key` turns those into one SHA-256 key. :class:`SearchCache` keeps
``{key: {"scores": {α: score}, "context": ...}}`` in one JSON file, written atomically; the
MergeCallback keeps it beside the run (``<default_root_dir>/alpha_search.json``), so rerunning a
stage, or resuming it, does not evaluate the grid again. Only missing α are evaluated, so widening
a grid costs only the new points.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_simo.evaluation import DELTA_FORMS, delta_mtl, mean_normalized_performance
from lightning_simo.io import atomic_write_text

if TYPE_CHECKING:
    from lightning_simo.tasks import Task

__all__ = [
    "SEARCH_METRICS",
    "SearchCache",
    "SearchResult",
    "check_search_metric",
    "default_cache_path",
    "search_key",
    "search_scaling",
    "search_score",
]

SEARCH_METRICS: tuple[str, ...] = DELTA_FORMS
"""The α-search criteria: ``ratio`` (the SIMO paper's tables) or ``difference`` (its code)."""


@dataclass(frozen=True)
class SearchResult:
    """The chosen α, every candidate's score, and which scores came from the cache."""

    best: float
    scores: dict[float, float]
    cached: tuple[float, ...] = ()


def search_key(**parts: Any) -> str:
    """A stable SHA-256 of JSON-serialisable ``parts`` (sorted keys; floats as written)."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class SearchCache:
    """Scores of past searches, one JSON file (``None``: an in-memory cache)."""

    path: Path | None = None
    _entries: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.path is None:
            return
        self.path = Path(self.path)
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):
                data = {}  # an unreadable cache is only a missed lookup
            self._entries = data if isinstance(data, dict) else {}

    def scores(self, key: str) -> dict[float, float]:
        entry = self._entries.get(key, {})
        return {float(a): float(s) for a, s in entry.get("scores", {}).items()}

    def store(self, key: str, scores: Mapping[float, float], context: Any = None) -> None:
        entry = self._entries.setdefault(key, {"scores": {}})
        entry["scores"].update({repr(float(a)): float(s) for a, s in scores.items()})
        if context is not None:
            entry["context"] = context
        if self.path is not None:
            text = json.dumps(self._entries, indent=1, sort_keys=True, default=str)
            atomic_write_text(self.path, text + "\n")


def check_search_metric(metric: str) -> str:
    """``metric`` if it names a search criterion, else a ValueError that lists them."""
    if metric not in SEARCH_METRICS:
        raise ValueError(
            f"search_metric must be one of {', '.join(SEARCH_METRICS)}, got {metric!r}."
        )
    return metric


def search_score(
    values: Mapping[str, float],
    baseline: Mapping[str, float],
    tasks: Mapping[str, Task],
    metric: str = "ratio",
) -> float:
    """The α-search score (larger is better) of ``values`` against the single-task ``baseline``.

    Each task counts once, through its primary metric. ``ratio``: the mean normalised
    performance; ``difference``: ``1 + Δ_MTL / 100`` in the difference form. Both equal 1 when
    every task matches its single-task model (see the module docstring for why they differ).
    """
    check_search_metric(metric)
    if metric == "ratio":
        return mean_normalized_performance(values, baseline, tasks)
    keys = [f"{t}/{spec.primary}" for t, spec in tasks.items()]
    higher = {k: spec.higher_is_better for k, spec in zip(keys, tasks.values(), strict=True)}
    picked = {k: values[k] for k in keys}
    reference = {k: baseline[k] for k in keys}
    return 1.0 + delta_mtl(picked, reference, higher, form="difference") / 100.0


def _check_grid(grid: Iterable[float]) -> tuple[float, ...]:
    values = tuple(float(a) for a in grid)
    if not values:
        raise ValueError("The α search needs at least one candidate in search_grid.")
    if any(not math.isfinite(a) or a < 0 for a in values):
        raise ValueError(f"Every α in search_grid must be a finite number >= 0, got {values}.")
    return values


def search_scaling(
    score: Callable[[float], float],
    grid: Sequence[float],
    *,
    cache: SearchCache | None = None,
    key: str | None = None,
    context: Any = None,
    on_step: Callable[[float, float], None] | None = None,
) -> SearchResult:
    """Evaluate ``score(α)`` (larger is better) over ``grid``; return the best α and all scores.

    With ``cache`` and ``key``, scores already stored under ``key`` are reused and new ones are
    stored (with ``context``, a readable record of what the key stands for). ``on_step(α,
    score)`` is called after each evaluation (progress). Non-finite scores never win.
    """
    values = _check_grid(grid)
    known = cache.scores(key) if cache is not None and key is not None else {}
    scores: dict[float, float] = {}
    fresh: dict[float, float] = {}
    for alpha in values:
        if alpha in known:
            scores[alpha] = known[alpha]
            continue
        scores[alpha] = fresh[alpha] = float(score(alpha))
        if on_step is not None:
            on_step(alpha, scores[alpha])
    if fresh and cache is not None and key is not None:
        cache.store(key, fresh, context)

    def rank(alpha: float) -> tuple[float, float]:
        value = scores[alpha]
        return (value if math.isfinite(value) else -math.inf, -alpha)

    best = max(values, key=rank)
    return SearchResult(best, scores, tuple(a for a in values if a in known))


def default_cache_path(root: str | os.PathLike[str]) -> Path:
    """Where the MergeCallback keeps its search cache: beside the run."""
    return Path(root) / "alpha_search.json"
