"""The α search as a pure function, and its cache keyed by what the scores depend on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lightning_simo.merging.search import (
    SEARCH_METRICS,
    SearchCache,
    SearchResult,
    search_key,
    search_scaling,
    search_score,
)
from lightning_simo.tasks import build_tasks


class _Score:
    """A concave score peaking at 0.6 that records which α it was asked for."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, alpha: float) -> float:
        self.calls.append(alpha)
        return -((alpha - 0.6) ** 2)


def test_search_keeps_the_best_alpha_and_every_score() -> None:
    score = _Score()
    result = search_scaling(score, [0.0, 0.5, 0.7, 1.0])
    assert result.best == 0.5  # 0.5 and 0.7 are equally far from 0.6: ties go to the smaller α
    assert score.calls == [0.0, 0.5, 0.7, 1.0]
    assert result.scores == pytest.approx({0.0: -0.36, 0.5: -0.01, 0.7: -0.01, 1.0: -0.16})
    assert result.cached == ()


def test_non_finite_scores_never_win() -> None:
    values = {0.0: -1.0, 0.5: math.nan, 1.0: math.inf * -1}
    assert search_scaling(values.__getitem__, [0.0, 0.5, 1.0]).best == 0.0


def test_bad_grids_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        search_scaling(_Score(), [])
    with pytest.raises(ValueError, match="finite number >= 0"):
        search_scaling(_Score(), [0.5, -1.0])


def test_a_repeated_search_is_a_lookup_and_survives_the_process(tmp_path: Path) -> None:
    path = tmp_path / "alpha_search.json"
    key = search_key(sources={"theta0": "aa", "depth": "bb"}, method="ties", options={"k": 1})
    first = search_scaling(_Score(), [0.0, 0.5, 1.0], cache=SearchCache(path), key=key)
    stored = json.loads(path.read_text())
    assert set(stored) == {key} and set(stored[key]["scores"]) == {"0.0", "0.5", "1.0"}

    again, cache = _Score(), SearchCache(path)  # a new process reads the file
    second = search_scaling(again, [0.0, 0.5, 1.0], cache=cache, key=key)
    assert again.calls == [] and second == type(first)(first.best, first.scores, (0.0, 0.5, 1.0))

    wider = _Score()
    third = search_scaling(wider, [0.0, 0.5, 0.6, 1.0], cache=cache, key=key)
    assert wider.calls == [0.6] and third.best == 0.6  # only the new point is evaluated

    other = _Score()
    search_scaling(other, [0.5], cache=cache, key=search_key(method="ties", options={"k": 2}))
    assert other.calls == [0.5]  # other options: another key


def test_search_key_depends_on_every_part_but_not_on_their_order() -> None:
    a = search_key(method="ties", options={"density": 0.2, "scaling": 1.0})
    assert a == search_key(options={"scaling": 1.0, "density": 0.2}, method="ties")
    assert a != search_key(method="ties", options={"density": 0.3, "scaling": 1.0})


def test_an_unreadable_cache_file_is_only_a_miss(tmp_path: Path) -> None:
    path = tmp_path / "alpha_search.json"
    path.write_text("{not json")
    score = _Score()
    search_scaling(score, [0.5], cache=SearchCache(path), key="k")
    assert score.calls == [0.5]
    assert json.loads(path.read_text())["k"]["scores"] == {"0.5": pytest.approx(-0.01)}


# ---------------------------------------------------------------------------- the criterion
_TASKS = build_tasks(["segmentation", "depth"], {"segmentation": 3})
_BASELINE = {"segmentation/miou": 0.5, "depth/abs_err": 1.0}
# α = 0.3 keeps segmentation but doubles the depth error; α = 0.6 loses some of both. The ratio
# form caps the depth loss at b / m = 0.5, the difference form charges (m - b) / b = 1 for it.
_AT = {
    0.3: {"segmentation/miou": 0.5, "depth/abs_err": 2.0},
    0.6: {"segmentation/miou": 0.3, "depth/abs_err": 1.25},
}


def _pick(metric: str) -> SearchResult:
    return search_scaling(lambda a: search_score(_AT[a], _BASELINE, _TASKS, metric), sorted(_AT))


def test_the_two_criteria_pick_different_alphas_where_they_disagree() -> None:
    ratio, difference = _pick("ratio"), _pick("difference")
    assert ratio.scores == pytest.approx({0.3: (1.0 + 0.5) / 2, 0.6: (0.6 + 0.8) / 2})
    assert difference.scores == pytest.approx(
        {0.3: 1 + (0.0 - 1.0) / 2, 0.6: 1 + (-0.4 - 0.25) / 2}
    )
    assert (ratio.best, difference.best) == (0.3, 0.6)


def test_both_criteria_read_one_at_the_single_task_models() -> None:
    for metric in SEARCH_METRICS:
        assert search_score(_BASELINE, _BASELINE, _TASKS, metric) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="search_metric must be one of ratio, difference"):
        search_score(_BASELINE, _BASELINE, _TASKS, "mean")
