"""Normalised performance, Δ_MTL and results tables.

Two Δ_MTL formulas are in use and they give different numbers on the same results, so both are
offered and every caller must say which one it reports:

- ``"ratio"``: mean over metrics of the normalised performance ``m / b`` (higher is better) or
  ``b / m`` (lower is better), minus 1. This is what the SIMO paper's tables print (NYUv2 task
  arithmetic: -27.5%).
- ``"difference"``: the mean signed relative difference ``(-1)^l (m - b) / b`` of Maninis et al.,
  which is also the SIMO paper's written Eq. 2 (the same task-arithmetic row gives -44.1%).

The two agree to first order near the baseline and drift apart as an error metric grows: a depth
error that doubles costs 50 points in the ratio form and 100 in the difference form.
"""

from __future__ import annotations

import csv
import io
import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lightning_simo.io import atomic_write_text, ensure_writable_dir

if TYPE_CHECKING:
    from lightning_simo.tasks import Task

__all__ = [
    "DELTA_FORMS",
    "delta_mtl",
    "evaluate_net",
    "mean_normalized_performance",
    "normalized_performance",
    "results_table",
    "write_results",
]

DELTA_FORMS: tuple[str, ...] = ("ratio", "difference")
_MISSING = "–"


def normalized_performance(value: float, baseline: float, higher_is_better: bool) -> float:
    """``value / baseline`` if higher is better, else ``baseline / value``; 1 means "as good".

    Oriented so that larger is always better, which lets metrics of opposite directions be averaged.
    """
    num, den = (value, baseline) if higher_is_better else (baseline, value)
    if den == 0:
        which = "baseline" if higher_is_better else "value"
        raise ValueError(f"normalized_performance: {which} is 0, the ratio is undefined.")
    return float(num) / float(den)


def _check_keys(
    results: Mapping[str, float],
    baseline: Mapping[str, float],
    higher_is_better: Mapping[str, bool],
) -> list[str]:
    mappings = {"results": results, "baseline": baseline, "higher_is_better": higher_is_better}
    keys: list[str] = []
    for m in mappings.values():
        keys.extend(k for k in m if k not in keys)
    if not keys:
        raise ValueError("delta_mtl needs at least one metric; all three mappings are empty.")
    for key in keys:
        lacking = [name for name, m in mappings.items() if key not in m]
        if lacking:
            raise ValueError(
                f"Metric {key!r} is missing from {', '.join(lacking)}; results, baseline and "
                "higher_is_better must name the same metrics."
            )
    return keys


def delta_mtl(
    results: Mapping[str, float],
    baseline: Mapping[str, float],
    higher_is_better: Mapping[str, bool],
    form: str = "ratio",
) -> float:
    """Δ_MTL in percent of ``results`` against single-task ``baseline``, averaged over metrics.

    Keys are metric names such as ``"segmentation/miou"``; each metric weighs the same, so pass
    one metric per task (the task's primary metric) to get the per-task average of the paper.
    ``form`` is ``"ratio"`` (the paper's tables) or ``"difference"`` (Maninis et al., Eq. 2); see
    the module docstring for why both exist. Negative means worse than the single-task models.
    """
    if form not in DELTA_FORMS:
        raise ValueError(f"Unknown Δ_MTL form {form!r}; valid forms: {', '.join(DELTA_FORMS)}.")
    keys = _check_keys(results, baseline, higher_is_better)
    terms: list[float] = []
    for key in keys:
        m, b, up = float(results[key]), float(baseline[key]), bool(higher_is_better[key])
        if b == 0:
            raise ValueError(f"Baseline of metric {key!r} is 0; relative changes are undefined.")
        if form == "ratio":
            if m == 0 and not up:
                raise ValueError(
                    f"Metric {key!r} is 0 and lower is better; its ratio b / m is undefined."
                )
            terms.append(normalized_performance(m, b, up) - 1.0)
        else:
            sign = 1.0 if up else -1.0
            terms.append(sign * (m - b) / b)
    return 100.0 * sum(terms) / len(terms)


def _as_python(value: object) -> object:
    """Unwrap one-element tensors / numpy scalars so they format like plain numbers."""
    item = getattr(value, "item", None)
    if callable(item) and not isinstance(value, (str, bytes)):
        try:
            return item()
        except (ValueError, RuntimeError, TypeError):  # not a single element: leave it be
            return value
    return value


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _format_cell(value: object) -> str:
    value = _as_python(value)
    if _is_missing(value):
        return _MISSING
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        # 4 significant digits matches the paper's precision (70.79, 0.2314, 18.02)
        return f"{float(value):.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _columns(rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None) -> list[str]:
    if columns is not None:
        return list(columns)
    seen: list[str] = []
    for row in rows:
        seen.extend(k for k in row if k not in seen)
    return seen


def results_table(
    rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None = None
) -> str:
    """A Markdown table of ``rows``, one column per key (first-seen order unless ``columns``).

    Numbers are shown with 4 significant digits; missing cells, ``None`` and NaN as "–", so a
    metric a method does not report is visibly absent rather than a misleading 0.
    """
    cols = _columns(rows, columns)
    if not cols:
        raise ValueError("results_table needs at least one column.")
    lines = [
        "| " + " | ".join(_format_cell(c) for c in cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_format_cell(row.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _csv_cell(value: object) -> object:
    """Full precision in the CSV (it is data, the Markdown is for reading); ``None`` -> empty."""
    value = _as_python(value)
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest text that round-trips; NaN -> "nan"
    return value


def write_results(
    rows: Sequence[Mapping[str, object]],
    directory: str | os.PathLike[str],
    stem: str = "results",
) -> tuple[Path, Path]:
    """Write ``<stem>.md`` (the Markdown table) and ``<stem>.csv`` into ``directory``.

    Both files are replaced atomically. Returns ``(markdown_path, csv_path)``.
    """
    directory = ensure_writable_dir(directory)
    cols = _columns(rows, None)
    md_path, csv_path = directory / f"{stem}.md", directory / f"{stem}.csv"

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for row in rows:
        writer.writerow([_csv_cell(row.get(c)) for c in cols])

    atomic_write_text(md_path, results_table(rows, cols))
    atomic_write_text(csv_path, buf.getvalue())
    return md_path, csv_path


def evaluate_net(
    net: torch.nn.Module,
    loader: Iterable[Mapping[str, torch.Tensor]],
    tasks: Mapping[str, Task],
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
) -> dict[str, float]:
    """Metrics of a SIMONet-like ``net`` (``net(images) -> {task: pred}``) over a loader.

    Used outside the Trainer loops (α search, task-relationship sweeps, teacher baselines), with
    the same metric objects as ``test``, so numbers are comparable.
    """
    metrics = {t: spec.make_metrics().to(device) for t, spec in tasks.items()}
    was_training = net.training
    net.eval()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            preds = net(batch["image"].to(device))
            for t, metric in metrics.items():
                metric.update(preds[t], batch[t].to(device))
    net.train(was_training)
    return {
        f"{t}/{name}": float(value)
        for t, metric in metrics.items()
        for name, value in metric.compute().items()
    }


def mean_normalized_performance(
    values: Mapping[str, float], baseline: Mapping[str, float], tasks: Mapping[str, Task]
) -> float:
    """Mean over tasks of the primary metric's normalised performance (the α-search score)."""
    scores = [
        normalized_performance(
            values[f"{t}/{s.primary}"], baseline[f"{t}/{s.primary}"], s.higher_is_better
        )
        for t, s in tasks.items()
    ]
    return sum(scores) / len(scores)
