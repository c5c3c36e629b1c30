"""Δ_MTL against the SIMO paper's NYUv2 rows, and the results-table writers."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from lightning_simo.evaluation import (
    DELTA_FORMS,
    delta_mtl,
    normalized_performance,
    results_table,
    write_results,
)

# NYUv2, ViT-B/14 (reference/simo-paper.md "Results"): mIoU / depth abs err / normal mean deg
HIGHER = {"segmentation/miou": True, "depth/abs_err": False, "normals/mean": False}


def _row(miou: float, depth: float, normal: float) -> dict[str, float]:
    return {"segmentation/miou": miou, "depth/abs_err": depth, "normals/mean": normal}


SINGLE_TASK = _row(70.79, 0.2314, 18.02)


def test_normalized_performance_orientation() -> None:
    assert normalized_performance(60.0, 80.0, True) == pytest.approx(0.75)
    assert normalized_performance(0.4, 0.2, False) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="value is 0"):
        normalized_performance(0.0, 0.2, False)


# Hand computation, task arithmetic 65.78 / 0.4171 / 26.13:
#   ratio:      (65.78/70.79 + 0.2314/0.4171 + 18.02/26.13)/3 - 1 = -0.27545 -> -27.5 (printed)
#   difference: (-0.07077 - 0.80250 - 0.45006)/3                  = -0.44111 -> -44.1
# Both match the paper's numbers to the printed digit.
@pytest.mark.parametrize(
    ("row", "form", "expected"),
    [
        (_row(65.78, 0.4171, 26.13), "ratio", -27.5),  # task arithmetic; exact: -27.545
        (_row(65.78, 0.4171, 26.13), "difference", -44.1),  # Eq. 2 form; exact: -44.111
        (_row(69.01, 0.2531, 19.01), "ratio", -5.4),  # joint MTL; exact: -5.432
        (_row(62.62, 0.4157, 31.38), "ratio", -32.8),  # TIES; exact: -32.817
        (_row(69.95, 0.2524, 19.29), "ratio", -5.4),  # TA + head re-align; exact: -5.363
        (_row(68.95, 0.2539, 18.99), "ratio", -5.5),  # TA + repr. re-align; exact: -5.523
        (_row(66.25, 0.2764, 18.65), "ratio", -8.7),  # TIES + head re-align; exact: -8.691
        (_row(68.49, 0.2576, 18.99), "ratio", -6.2),  # TIES + repr. re-align; exact: -6.176
    ],
)
def test_delta_mtl_reproduces_paper_nyuv2(
    row: dict[str, float], form: str, expected: float
) -> None:
    assert delta_mtl(row, SINGLE_TASK, HIGHER, form=form) == pytest.approx(expected, abs=0.15)


def test_delta_mtl_exact_values_and_forms_agree_at_baseline() -> None:
    ta = _row(65.78, 0.4171, 26.13)
    ratio = (65.78 / 70.79 + 0.2314 / 0.4171 + 18.02 / 26.13) / 3 - 1
    diff = ((65.78 - 70.79) / 70.79 - (0.4171 - 0.2314) / 0.2314 - (26.13 - 18.02) / 18.02) / 3
    assert delta_mtl(ta, SINGLE_TASK, HIGHER) == pytest.approx(100 * ratio, rel=1e-12)
    assert delta_mtl(ta, SINGLE_TASK, HIGHER, form="difference") == pytest.approx(100 * diff)
    for form in DELTA_FORMS:
        assert delta_mtl(SINGLE_TASK, SINGLE_TASK, HIGHER, form=form) == pytest.approx(0.0)


def test_delta_mtl_errors_name_the_problem() -> None:
    partial = {"segmentation/miou": 65.0, "depth/abs_err": 0.3}
    with pytest.raises(ValueError, match=r"'normals/mean'.*results"):
        delta_mtl(partial, SINGLE_TASK, HIGHER)
    with pytest.raises(ValueError, match=r"'extra'.*baseline, higher_is_better"):
        delta_mtl({**SINGLE_TASK, "extra": 1.0}, SINGLE_TASK, HIGHER)
    with pytest.raises(ValueError, match="ratio, difference"):
        delta_mtl(SINGLE_TASK, SINGLE_TASK, HIGHER, form="log")
    zero = {**SINGLE_TASK, "depth/abs_err": 0.0}
    with pytest.raises(ValueError, match="'depth/abs_err'"):
        delta_mtl(SINGLE_TASK, zero, HIGHER, form="difference")
    with pytest.raises(ValueError, match="at least one"):
        delta_mtl({}, {}, {})


def test_results_table_formatting() -> None:
    rows = [
        {"method": "single-task", "miou": 70.79, "depth": 0.2314, "delta": 0.0},
        {"method": "TA | merged", "miou": torch.tensor(65.7812), "depth": None, "epochs": 50},
        {"method": "broken", "miou": float("nan")},
    ]
    table = results_table(rows)
    assert table.splitlines() == [
        "| method | miou | depth | delta | epochs |",
        "|---|---|---|---|---|",
        "| single-task | 70.79 | 0.2314 | 0 | – |",
        "| TA \\| merged | 65.78 | – | – | 50 |",
        "| broken | – | – | – | – |",
    ]
    assert results_table(rows, columns=["miou"]).splitlines()[2] == "| 70.79 |"


def test_write_results_markdown_and_csv(tmp_path: Path) -> None:
    rows = [
        {"method": "TA", "delta_ratio": -27.545123456, "depth": None},
        {"method": "MTL", "delta_ratio": -5.432, "depth": 0.2531},
    ]
    out = tmp_path / "nested" / "dir"
    md_path, csv_path = write_results(rows, out)
    assert (md_path, csv_path) == (out / "results.md", out / "results.csv")
    assert md_path.read_text(encoding="utf-8") == results_table(rows)
    with csv_path.open(newline="", encoding="utf-8") as f:
        read = list(csv.DictReader(f))
    assert read[0] == {"method": "TA", "delta_ratio": "-27.545123456", "depth": ""}
    assert float(read[1]["depth"]) == 0.2531
    # rewriting replaces the files and leaves no temporary files behind
    md2, _ = write_results(rows[:1], out, stem="results")
    assert "MTL" not in md2.read_text(encoding="utf-8")
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.md"]


def test_write_results_custom_stem_and_nan(tmp_path: Path) -> None:
    md_path, csv_path = write_results([{"a": float("nan")}], tmp_path, stem="val")
    assert md_path.name == "val.md" and csv_path.name == "val.csv"
    value = csv_path.read_text(encoding="utf-8").splitlines()[1]
    assert math.isnan(float(value))
