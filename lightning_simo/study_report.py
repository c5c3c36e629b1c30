"""What the study reports: mean ± std and t-intervals over seeds, the table, the claims, figures.

Every number of ``results.md`` / ``results.csv`` is the mean over seeds with its sample standard
deviation and a two-sided t-interval (``mean ± t_{(1+c)/2, n-1} · std / √n``, Student's t with
n − 1 degrees of freedom; c = 0.95 by default). One seed has no interval: the value is shown alone.

The claims section checks the SIMO paper's claims from the run's own numbers. A claim *holds*
only when its interval supports it (an upper bound below a threshold, an interval inside a band):
with one seed the point values are used and the section says so.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_simo.io import atomic_write, atomic_write_text

__all__ = [
    "COST_COLUMNS",
    "Claim",
    "Interval",
    "claims_markdown",
    "evaluate_claims",
    "interval",
    "summarise",
    "table_columns",
    "write_figures",
    "write_tables",
]

SUMMARY_COLUMNS = ("method", "delta_mtl_ratio", "delta_mtl_difference")
COST_COLUMNS = (
    "epochs",
    "trainable_params",
    "optimizer_steps",
    "labelled_samples",
    "encoder_forward",
    "encoder_backward",
    "wall_time_s",
)
STAT_SUFFIXES = ("_std", "_low", "_high")

MERGE_LOSS_THRESHOLD = -10.0
"""Claim (a): merging alone loses heavily, Δ_MTL (ratio, %) below this for every merge method."""
MTL_BAND = 5.0
"""Claim (d): "within a few points": Δ_MTL of joint MTL inside ± this many points (%)."""
REFERENCE_MTL = "joint MTL (equal)"
"""The joint-MTL row the claims compare with (the paper's joint baseline: equal weighting)."""


# ----------------------------------------------------------------------------- intervals
@dataclass(frozen=True)
class Interval:
    """Mean, sample std and a two-sided t-interval of ``n`` values (std / bounds ``None`` for
    one value)."""

    mean: float
    std: float | None
    low: float | None
    high: float | None
    n: int


def interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """The mean of ``values`` with its t-interval at ``confidence`` (Student's t, n − 1 dof)."""
    from scipy.stats import t

    data = [float(v) for v in values]
    if not data:
        raise ValueError("interval needs at least one value.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}.")
    mean = statistics.fmean(data)
    if len(data) == 1:
        return Interval(mean, None, None, None, 1)
    std = statistics.stdev(data)
    half = float(t.ppf((1.0 + confidence) / 2.0, len(data) - 1)) * std / math.sqrt(len(data))
    return Interval(mean, std, mean - half, mean + half, len(data))


def _numeric(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and not (isinstance(value, float) and math.isnan(value))
    )


def summarise(per_seed: Sequence[Sequence[Mapping[str, Any]]], confidence: float = 0.95) -> list:
    """One row per method (first-seen order): every numeric column's mean over seeds, with
    ``<key>_std``, ``<key>_low`` and ``<key>_high`` (the t-interval) when there are 2+ seeds."""
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    for rows in per_seed:
        for row in rows:
            by_method.setdefault(row["method"], []).append(row)
    out: list[dict[str, Any]] = []
    for method, rows in by_method.items():
        agg: dict[str, Any] = {"method": method, "seeds": len(rows)}
        for key in ("group", "task", "budget"):
            if rows[0].get(key) is not None:
                agg[key] = rows[0][key]
        keys = [k for k in rows[0] if k not in ("method", "group", "task", "budget")]
        for key in keys:
            values = [r[key] for r in rows if _numeric(r.get(key))]
            if not values:
                continue
            stats = interval(values, confidence)
            agg[key] = stats.mean
            if stats.std is not None:
                agg[f"{key}_std"] = stats.std
                agg[f"{key}_low"] = stats.low
                agg[f"{key}_high"] = stats.high
        out.append(agg)
    return out


# ----------------------------------------------------------------------------- tables
def table_columns(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> list[str]:
    """method, Δ_MTL, the task metrics (primary, then normalised), then the costs."""

    def order(key: str) -> tuple[int, str]:
        task = key.split("/")[0]
        return (tasks.index(task) if task in tasks else 99, key)

    metric_cols = sorted(
        {k for r in rows for k in r if "/" in k and not k.endswith(STAT_SUFFIXES)}, key=order
    )
    normalized = [c for c in metric_cols if c.endswith("/normalized")]
    primary = [c for c in metric_cols if c not in normalized]
    costs = [c for c in COST_COLUMNS if any(c in r for r in rows)]
    return ["method", *SUMMARY_COLUMNS[1:], *primary, *normalized, *costs]


def _number(value: float) -> str:
    if abs(value) >= 1e4 or (float(value).is_integer() and abs(value) < 1e15):
        return f"{value:.0f}"
    return f"{value:.4g}"


def format_cell(row: Mapping[str, Any], key: str) -> str:
    """``mean ± std [low, high]``; the value alone when seeds agree or there is one seed."""
    value = row.get(key)
    if not _numeric(value):
        return "–" if value is None or isinstance(value, float) else str(value)
    std = row.get(f"{key}_std")
    if not _numeric(std) or std == 0:
        return _number(value)
    return f"{_number(value)} ± {std:.2g} [{_number(row[f'{key}_low'])}, {_number(row[f'{key}_high'])}]"


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [format_cell(row, c).replace("|", "\\|") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    return repr(float(value)) if isinstance(value, float) else value


def write_tables(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    out: str | Path,
    confidence: float = 0.95,
) -> tuple[Path, Path]:
    """``results.md`` (the table, how to read it, the claims) and ``results.csv`` (every column
    with ``_std``, ``_low``, ``_high``, full precision)."""
    out = Path(out)
    seeds = max((int(r.get("seeds", 1)) for r in rows), default=1)
    if seeds > 1:
        legend = (
            f"Mean ± std over {seeds} seeds [{confidence:.0%} t-interval]; a value alone: every "
            "seed gave the same.\n\n"
        )
    else:
        legend = "One seed: no interval (run with --seeds 3 or more for intervals).\n\n"
    claims = claims_markdown(evaluate_claims(rows))
    md = legend + markdown_table(rows, columns) + "\n" + claims
    csv_cols = ["method", "seeds"]
    for col in columns[1:]:
        csv_cols += [col, *(f"{col}{s}" for s in STAT_SUFFIXES)]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(csv_cols)
    for row in rows:
        writer.writerow([_csv_value(row.get(c)) for c in csv_cols])
    md_path = atomic_write_text(out / "results.md", md)
    csv_path = atomic_write_text(out / "results.csv", buf.getvalue())
    return md_path, csv_path


# ----------------------------------------------------------------------------- claims
@dataclass(frozen=True)
class Claim:
    """One claim of the paper, checked: ``holds`` is ``None`` when the run lacks its rows."""

    label: str
    statement: str
    holds: bool | None
    evidence: str


def _bounds(row: Mapping[str, Any], key: str) -> tuple[float, float, float]:
    mean = float(row[key])
    low, high = row.get(f"{key}_low"), row.get(f"{key}_high")
    return (mean, mean if low is None else float(low), mean if high is None else float(high))


def _delta(row: Mapping[str, Any]) -> str:
    mean, low, high = _bounds(row, "delta_mtl_ratio")
    if row.get("delta_mtl_ratio_low") is None:
        return f"{row['method']} {mean:+.1f}%"
    return f"{row['method']} {mean:+.1f}% [{low:+.1f}, {high:+.1f}]"


def _with_delta(rows: Sequence[Mapping[str, Any]], *groups: str) -> list[Mapping[str, Any]]:
    return [r for r in rows if r.get("group") in groups and _numeric(r.get("delta_mtl_ratio"))]


def _reference_mtl(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    mtl = _with_delta(rows, "mtl")
    return next((r for r in mtl if r["method"] == REFERENCE_MTL), mtl[0] if mtl else None)


def _best_realigned(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    realigned = _with_delta(rows, "realign-heads", "realign-adapters")
    return max(realigned, key=lambda r: r["delta_mtl_ratio"], default=None)


def evaluate_claims(rows: Sequence[Mapping[str, Any]]) -> list[Claim]:
    """Claims (a)-(d) of the SIMO paper, from summary rows (see the module docstring)."""
    claims = []
    merges = _with_delta(rows, "merge")
    claims.append(
        Claim(
            "a",
            f"merging alone loses heavily (Δ_MTL of every merge method below "
            f"{MERGE_LOSS_THRESHOLD:g}%)",
            all(_bounds(r, "delta_mtl_ratio")[2] < MERGE_LOSS_THRESHOLD for r in merges)
            if merges
            else None,
            "; ".join(_delta(r) for r in merges) or "no merge rows",
        )
    )
    mtl, best = _reference_mtl(rows), _best_realigned(rows)
    if mtl is None or best is None:
        missing = "no joint-MTL row" if mtl is None else "no labelled re-alignment row"
        claims.append(Claim("b", "re-alignment recovers to joint MTL", None, missing))
        claims.append(Claim("c", "re-alignment costs less than joint MTL", None, missing))
    else:
        low = _bounds(mtl, "delta_mtl_ratio")[1]
        claims.append(
            Claim(
                "b",
                "re-alignment recovers to within the interval of joint MTL (best re-aligned "
                "mean at or above the lower bound of joint MTL)",
                float(best["delta_mtl_ratio"]) >= low,
                f"{_delta(best)} vs {_delta(mtl)}",
            )
        )
        ratios = {}
        for key in ("labelled_samples", "optimizer_steps", "encoder_backward"):
            if _numeric(best.get(key)) and _numeric(mtl.get(key)) and mtl[key]:
                ratios[key] = float(best[key]) / float(mtl[key])
        needed = ("labelled_samples", "optimizer_steps")
        claims.append(
            Claim(
                "c",
                "re-alignment uses fewer labelled samples and fewer optimizer steps than joint MTL",
                all(ratios[k] < 1.0 for k in needed) if all(k in ratios for k in needed) else None,
                f"{best['method']} / {mtl['method']}: "
                + ", ".join(f"{k.replace('_', ' ')} ×{v:.3g}" for k, v in ratios.items()),
            )
        )
    if mtl is None:
        claims.append(Claim("d", "joint MTL is close to the single-task models", None, "no row"))
    else:
        _, low, high = _bounds(mtl, "delta_mtl_ratio")
        claims.append(
            Claim(
                "d",
                f"joint MTL is within a few points of the single-task models (its interval "
                f"inside ±{MTL_BAND:g}%)",
                -MTL_BAND <= low and high <= MTL_BAND,
                _delta(mtl),
            )
        )
    return claims


def claims_markdown(claims: Sequence[Claim]) -> str:
    """The ``## Claims`` section: one line per claim, ``holds`` / ``does not hold``."""
    lines = [
        "## Claims",
        "",
        "Checked from this run's numbers (Δ_MTL ratio form; an interval must support a claim for "
        "it to hold; one seed: the point values).",
        "",
    ]
    for claim in claims:
        verdict = {True: "holds", False: "does not hold", None: "not evaluated"}[claim.holds]
        lines.append(f"- ({claim.label}) {claim.statement}: **{verdict}**. {claim.evidence}.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- figures
def _half_widths(rows: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    out = []
    for r in rows:
        high = r.get(f"{key}_high")
        out.append(0.0 if high is None else float(high) - float(r[key]))
    return out


def write_figures(rows: Sequence[Mapping[str, Any]], out: str | Path) -> list[Path]:
    """Δ_MTL per method, the sample-efficiency curve and the cost Pareto plots (PNG, atomic);
    error bars are the t-intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    key = "delta_mtl_ratio"
    paths = []
    shown = [r for r in rows if _numeric(r.get(key)) and r.get("group") != "budget"]
    if shown:
        fig, ax = plt.subplots(figsize=(8, 0.4 * len(shown) + 1.5))
        values = [r[key] for r in shown]
        colors = ["tab:gray" if v >= 0 else "tab:red" for v in values]
        ax.barh([r["method"] for r in shown], values, color=colors, xerr=_half_widths(shown, key))
        ax.axvline(0, color="black", linewidth=0.8)
        ax.invert_yaxis()
        ax.set_xlabel("Δ_MTL vs single-task models (ratio form, %; bars: 95% interval)")
        fig.tight_layout()
        paths.append(_save_figure(fig, out / "delta_mtl.png"))
        plt.close(fig)
    budget = sorted((r for r in rows if r.get("group") == "budget"), key=lambda r: r["budget"])
    full = next((r for r in rows if r.get("group") == "realign-heads"), None)
    if budget:
        points = budget + ([{**full, "budget": 1.0}] if full else [])
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.errorbar(
            [100 * r["budget"] for r in points],
            [r[key] for r in points],
            yerr=_half_widths(points, key),
            marker="o",
            capsize=3,
            label="merge + head re-alignment",
        )
        for i, r in enumerate(_with_delta(rows, "mtl")):
            ax.axhline(r[key], linestyle="--", linewidth=1, color=f"C{i + 1}", label=r["method"])
        ax.set_xscale("log")
        ax.set_xlabel("labelled re-alignment samples (% of the val split)")
        ax.set_ylabel("Δ_MTL (ratio form, %)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(_save_figure(fig, out / "sample_efficiency.png"))
        plt.close(fig)
    costed = [r for r in rows if _numeric(r.get(key)) and _numeric(r.get("optimizer_steps"))]
    if costed:
        fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
        markers = "os^vD<>pP*hX"
        for axis, cost in zip(axes, ("labelled_samples", "optimizer_steps"), strict=True):
            for i, r in enumerate(costed):
                axis.errorbar(
                    float(r.get(cost) or 0),
                    r[key],
                    yerr=_half_widths([r], key),
                    marker=markers[i % len(markers)],
                    color=f"C{i % 10}",
                    linestyle="none",
                    capsize=3,
                    label=r["method"],
                )
            axis.set_xscale("symlog", linthresh=10)
            axis.set_xlabel(cost.replace("_", " ") + " (0: none)")
            axis.axhline(0, color="black", linewidth=0.6)
        axes[0].set_ylabel("Δ_MTL (ratio form, %)")
        axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.tight_layout()
        paths.append(_save_figure(fig, out / "pareto.png"))
        plt.close(fig)
    return paths


def _save_figure(fig: Any, path: Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
