"""Task relationships: λ sweeps along each task vector, and how the task vectors relate.

The SIMO paper's analysis: start from the pretrained encoder θ0 with every task's fine-tuned head
attached, move along one task vector, θ0 + λ·τ_t, and watch every task's normalised metric.
Secondary curves that rise mean the tasks share what τ_t learned; a task that only recovers near
λ = 1 is sensitive to changes of its representation. Pairwise cosine similarities and norms of
the task vectors complete the picture.

The functions take plain state dicts and a loader, so a notebook can use them without Lightning;
``lightning_simo analyze --config <merge config>`` builds the same inputs from the config users
run for merging (:func:`inputs_from_config`) and writes CSV tables, PNG figures and TensorBoard
figures (:func:`run_analysis`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from lightning_simo.checkpoints import encoder_state_dict
from lightning_simo.data.base import SPLITS, DenseDataModule
from lightning_simo.evaluation import evaluate_net, normalized_performance
from lightning_simo.io import atomic_write, atomic_write_text, ensure_writable_dir
from lightning_simo.merging.sources import check_encoders, load_sources, sources_from_states
from lightning_simo.merging.task_vectors import (
    apply_task_vector,
    cosine_similarity_matrix,
    is_bn_running_stat,
    norms,
    task_vector,
    task_vectors,
)

if TYPE_CHECKING:
    from lightning_simo.tasks import Task

__all__ = [
    "AnalysisInputs",
    "DEFAULT_LAMBDAS",
    "add_task_vector",
    "inputs_from_config",
    "lambda_grid",
    "lambda_sweep",
    "main",
    "parse_args",
    "plot_lambda_sweep",
    "plot_similarity",
    "run_analysis",
    "single_task_baseline",
    "task_vector_similarity",
]

StateDict = Mapping[str, Tensor]
OnStep = Callable[[str], None]


def lambda_grid(num: int = 16, max_lambda: float = 1.5) -> list[float]:
    """``num`` evenly spaced λ from 0 to ``max_lambda``, computed as ``max·i/(num-1)``.

    Computing each point directly (rather than accumulating a step) keeps round grids exact:
    the default grid holds 1.0 itself, where a task vector reproduces its fine-tuned model. A
    grid holds 1.0 when ``(num - 1) / max_lambda`` is a whole number (4, 7, 10, 13 or 16 points
    up to 1.5).
    """
    if num < 2:
        raise ValueError(f"A λ sweep needs at least 2 points, got {num}.")
    if not (math.isfinite(max_lambda) and max_lambda > 0):
        raise ValueError(f"max_lambda must be a finite number > 0, got {max_lambda}.")
    return [max_lambda * i / (num - 1) for i in range(num)]


DEFAULT_LAMBDAS: tuple[float, ...] = tuple(lambda_grid())
"""The paper's grid: 16 points in [0, 1.5] (0, 0.1, ..., 1.5)."""


def add_task_vector(theta0: StateDict, finetuned: StateDict, lam: float) -> dict[str, Tensor]:
    """θ0 + λ·(θ_t − θ0) for every floating-point tensor, in θ0's dtypes.

    The core's :func:`~lightning_simo.merging.task_vectors.apply_task_vector` on a float64 task
    vector (:func:`wide_task_vector`), so that both anchors of the sweep are the models
    themselves: λ = 0 gives θ0 and λ = 1 gives θ_t bit for bit whenever each weight and its
    fine-tuned value are within a factor 2**29 of each other (float32 weights, float64
    arithmetic). Integer buffers (step counters) are θ0's; BatchNorm running variances are
    clamped at 0, since extrapolating (λ > 1) can push them negative.
    """
    return apply_task_vector(theta0, wide_task_vector(theta0, finetuned), lam)


def wide_task_vector(theta0: StateDict, finetuned: StateDict) -> dict[str, Tensor]:
    """θ_t − θ0 in float64 (exact for float32 / bf16 weights within a factor 2**29)."""
    wide = {k: v.double() if v.is_floating_point() else v for k, v in theta0.items()}
    return task_vector(wide, finetuned)


@contextlib.contextmanager
def _restored(net: nn.Module) -> Iterator[None]:
    """Give ``net`` its weights back afterwards: the sweeps swap encoders and heads in place."""
    saved = {k: v.detach().clone() for k, v in net.state_dict().items()}
    try:
        yield
    finally:
        net.load_state_dict(saved)


def _load_encoder(net: nn.Module, state: StateDict) -> None:
    unexpected = net.encoder.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"Encoder weights do not fit the model's encoder: {unexpected[:5]}.")


def single_task_baseline(
    net: nn.Module,
    finetuned: Mapping[str, StateDict],
    loader: Iterable[Mapping[str, Tensor]],
    tasks: Mapping[str, Task],
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
    on_step: OnStep | None = None,
) -> dict[str, float]:
    """Every metric of each task's own fine-tuned encoder + head on ``loader``.

    The normalisation reference of the sweep: evaluated with the same net, loader and metric
    objects as the sweep, so the sweep at λ = 1 for a task's own vector reproduces it exactly.
    ``net``'s weights are restored afterwards.
    """
    sources = sources_from_states(list(tasks), net.encoder.state_dict(), finetuned)
    baseline: dict[str, float] = {}
    net.to(device)
    with _restored(net):
        sources.attach_heads(net)
        for task, spec in tasks.items():
            _load_encoder(net, sources.encoders[task])
            baseline.update(evaluate_net(net, loader, {task: spec}, device, max_batches))
            if on_step is not None:
                on_step(f"baseline {task}")
    return baseline


def lambda_sweep(
    net: nn.Module,
    theta0: StateDict,
    finetuned: Mapping[str, StateDict],
    loader: Iterable[Mapping[str, Tensor]],
    tasks: Mapping[str, Task],
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    baseline: Mapping[str, float] | None = None,
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
    on_step: OnStep | None = None,
) -> list[dict[str, Any]]:
    """Every task's primary metric along θ0 + λ·τ_s, for each task vector τ_s and each λ.

    Args:
        net: a SIMONet-like model (``encoder``, ``heads``) holding a head for every task.
        theta0: the pretrained encoder's weights (any key form :func:`encoder_state_dict`
            accepts, e.g. ``net.encoder.state_dict()``).
        finetuned: ``{task: state dict}`` of the single-task checkpoints, encoder and head (as
            :func:`lightning_simo.checkpoints.load_state_dict` returns them); every task's own
            head is attached for the whole sweep.
        loader: an ordered loader of the split to evaluate on.
        tasks: the tasks (``SIMOModule.task_specs``).
        lambdas: the scales of each task vector.
        baseline: single-task values to normalise by; computed with
            :func:`single_task_baseline` when ``None``.
        max_batches: evaluate on at most this many batches.
        on_step: called after each evaluation with a short label (progress bars).

    Returns:
        One row per (source task vector, λ, evaluated task): ``source_task``, ``lambda``,
        ``task``, ``metric`` (the primary metric's name), ``value`` and ``normalized`` (1 means
        as good as the single-task model, larger is better). ``net``'s weights are restored.
    """
    sources = sources_from_states(list(tasks), theta0, finetuned)
    if baseline is None:
        baseline = single_task_baseline(net, finetuned, loader, tasks, device, max_batches)
    rows: list[dict[str, Any]] = []
    net.to(device)
    with _restored(net):
        sources.attach_heads(net)
        for source in tasks:
            tau = wide_task_vector(sources.theta0, sources.encoders[source])
            for lam in lambdas:
                _load_encoder(net, apply_task_vector(sources.theta0, tau, float(lam)))
                values = evaluate_net(net, loader, tasks, device, max_batches)
                for task, spec in tasks.items():
                    key = f"{task}/{spec.primary}"
                    rows.append(
                        {
                            "source_task": source,
                            "lambda": float(lam),
                            "task": task,
                            "metric": spec.primary,
                            "value": values[key],
                            "normalized": normalized_performance(
                                values[key], baseline[key], spec.higher_is_better
                            ),
                        }
                    )
                if on_step is not None:
                    on_step(f"τ_{source} λ={lam:g}")
    return rows


def task_vector_similarity(
    theta0: StateDict, finetuned: Mapping[str, StateDict]
) -> tuple[list[str], Tensor, Tensor]:
    """``(names, cosine, norms)`` of the encoders' task vectors.

    ``cosine`` is the ``(n, n)`` pairwise cosine similarity, ``norms`` the L2 norm of each vector
    (both float64). BatchNorm running statistics are left out: they are estimated, not learned,
    and their scale would swamp the weights'.
    """
    base = encoder_state_dict(theta0)
    names = list(finetuned)
    encoders = [encoder_state_dict(finetuned[t]) for t in names]
    check_encoders(base, {f"the {t!r} checkpoint": e for t, e in zip(names, encoders)})
    vectors = [
        {k: v for k, v in vector.items() if not is_bn_running_stat(k)}
        for vector in task_vectors(base, encoders)
    ]
    return names, cosine_similarity_matrix(vectors), norms(vectors)


# ----------------------------------------------------------------------------- figures
def plot_lambda_sweep(rows: Sequence[Mapping[str, Any]]) -> Figure:
    """One panel per source task vector: every task's normalised metric against λ.

    A dashed line marks 1.0 (as good as the single-task model) and a dotted one λ = 1 (the
    source task's own fine-tuned encoder).
    """
    if not rows:
        raise ValueError("plot_lambda_sweep needs at least one row.")
    sources = list(dict.fromkeys(r["source_task"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig = Figure(figsize=(3.6 * len(sources), 3.4), layout="constrained")
    axes = fig.subplots(1, len(sources), sharey=True, squeeze=False)[0]
    colors = {t: f"C{i}" for i, t in enumerate(tasks)}
    for ax, source in zip(axes, sources):
        for task in tasks:
            points = sorted(
                (r["lambda"], r["normalized"])
                for r in rows
                if r["source_task"] == source and r["task"] == task
            )
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker="o",
                markersize=3,
                color=colors[task],
                linewidth=2.2 if task == source else 1.2,
                label=task,
            )
        ax.axhline(1.0, linestyle="--", color="0.35", linewidth=1)
        ax.axvline(1.0, linestyle=":", color="0.6", linewidth=1)
        ax.set_title(f"θ0 + λ·τ_{source}")
        ax.set_xlabel("λ")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("normalised metric (1 = single-task)")
    axes[-1].legend(title="evaluated task", fontsize="small")
    return fig


def plot_similarity(
    cos: Tensor | Sequence[Sequence[float]], norms: Tensor | Sequence[float], names: Sequence[str]
) -> Figure:
    """Heatmap of the task vectors' pairwise cosine similarities, values written in the cells
    and each vector's norm in its label (a long vector dominates a sum even when aligned)."""
    matrix = torch.as_tensor(cos, dtype=torch.float64)
    lengths = torch.as_tensor(norms, dtype=torch.float64)
    n = len(names)
    if matrix.shape != (n, n) or lengths.shape != (n,):
        raise ValueError(
            f"plot_similarity: {n} names need a {n}x{n} matrix and {n} norms, got "
            f"{tuple(matrix.shape)} and {tuple(lengths.shape)}."
        )
    fig = Figure(figsize=(1.4 * n + 2.2, 1.2 * n + 1.4), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix.numpy(), vmin=-1.0, vmax=1.0, cmap="RdBu_r")
    labels = [f"{name}\n‖τ‖={float(length):.3g}" for name, length in zip(names, lengths)]
    ax.set_xticks(range(n), labels)
    ax.set_yticks(range(n), labels)
    for i in range(n):
        for j in range(n):
            value = float(matrix[i, j])
            ax.text(
                j,
                i,
                f"{value:.2f}",
                ha="center",
                va="center",
                color="white" if abs(value) > 0.6 else "black",
            )
    ax.set_title("cosine similarity of task vectors")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


# ----------------------------------------------------------------------------- outputs
def _save_figure(fig: Figure, path: Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def _csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    # repr: the shortest text that reads back as the same float (a 1.0 stays exactly 1.0)
    writer.writerows([repr(v) if isinstance(v, float) else v for v in row] for row in rows)
    return buf.getvalue()


@dataclass
class AnalysisInputs:
    """Everything the analysis needs, as a merge config describes it."""

    net: nn.Module
    tasks: dict[str, Task]
    theta0: dict[str, Tensor]
    finetuned: dict[str, dict[str, Tensor]]
    datamodule: DenseDataModule
    device: torch.device
    root_dir: Path


def inputs_from_config(config: str | Path, overrides: Sequence[str] = ()) -> AnalysisInputs:
    """Build model, data and checkpoints from a merge config, exactly as ``fit`` would.

    θ0 is ``merge.pretrained`` when set, else the model's own encoder (the config's encoder
    checkpoint); ``merge.checkpoints`` gives each task's fine-tuned encoder and head. Nothing is
    merged or trained. ``overrides`` are further CLI arguments (``--trainer.default_root_dir=x``).
    """
    from lightning_simo.callbacks.merge import MergeCallback
    from lightning_simo.cli import build_cli

    cli = build_cli(["--config", str(config), *overrides], run=False)
    model, trainer = cli.model, cli.trainer
    net, tasks = getattr(model, "net", None), getattr(model, "task_specs", None)
    if net is None or tasks is None:
        raise ValueError("analyze works with SIMOModule configs (a model with `net` and tasks).")
    merge = next((cb for cb in trainer.callbacks if isinstance(cb, MergeCallback)), None)
    if merge is None:
        raise ValueError(
            f"{config}: analyze needs merge.checkpoints ({{task: path}}), the single-task "
            "checkpoints whose task vectors it studies; use the merge config."
        )
    own = {k: v.detach().clone() for k, v in net.encoder.state_dict().items()}
    sources = load_sources(merge.checkpoints, list(tasks), merge.pretrained or own)
    return AnalysisInputs(
        net=net,
        tasks=dict(tasks),
        theta0=sources.theta0,
        finetuned=sources.states,
        datamodule=cli.datamodule,
        device=trainer.strategy.root_device,
        root_dir=Path(trainer.default_root_dir),
    )


def run_analysis(
    inputs: AnalysisInputs,
    out: str | Path | None = None,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    split: str = "val",
    max_batches: int | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Sweep, similarities, and their files in ``out`` (default ``<root_dir>/analysis``).

    Writes ``lambda_sweep.csv``/``.png`` and ``task_vectors.csv``/``.png`` atomically and adds
    both figures to TensorBoard under ``out/tb``. Returns the paths by file stem and ``"tb"``.
    """
    from rich.progress import Progress
    from torch.utils.tensorboard import SummaryWriter

    out_dir = ensure_writable_dir(out if out is not None else inputs.root_dir / "analysis")
    loader = inputs.datamodule.loader(split)
    steps = len(inputs.tasks) * (len(lambdas) + 1)
    with Progress(disable=not progress, transient=False) as bar:
        job = bar.add_task(f"λ sweep on {split}", total=steps)

        def advance(label: str) -> None:
            bar.update(job, advance=1, description=label)

        common = {
            "loader": loader,
            "tasks": inputs.tasks,
            "device": inputs.device,
            "max_batches": max_batches,
            "on_step": advance,
        }
        baseline = single_task_baseline(inputs.net, inputs.finetuned, **common)
        rows = lambda_sweep(
            inputs.net,
            inputs.theta0,
            inputs.finetuned,
            lambdas=lambdas,
            baseline=baseline,
            **common,
        )
    names, cos, lengths = task_vector_similarity(inputs.theta0, inputs.finetuned)

    header = ["source_task", "lambda", "task", "metric", "value", "normalized"]
    paths = {
        "lambda_sweep.csv": atomic_write_text(
            out_dir / "lambda_sweep.csv", _csv_text(header, ([r[h] for h in header] for r in rows))
        ),
        "task_vectors.csv": atomic_write_text(
            out_dir / "task_vectors.csv",
            _csv_text(
                ["task", "norm", *(f"cos_{n}" for n in names)],
                ([n, float(lengths[i]), *(float(c) for c in cos[i])] for i, n in enumerate(names)),
            ),
        ),
    }
    figures = {
        "lambda_sweep": plot_lambda_sweep(rows),
        "task_vectors": plot_similarity(cos, lengths, names),
    }
    writer = SummaryWriter(str(out_dir / "tb"))
    try:
        for stem, fig in figures.items():
            paths[f"{stem}.png"] = _save_figure(fig, out_dir / f"{stem}.png")
            writer.add_figure(f"analysis/{stem}", fig, close=False)
    finally:
        writer.close()
    paths["tb"] = out_dir / "tb"
    return paths


# ----------------------------------------------------------------------------- command
def _parser() -> Any:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="lightning_simo analyze",
        description="Task relationships of the single-task checkpoints named in a merge config: "
        "a λ sweep along each task vector and the vectors' cosine similarities and "
        "norms. Arguments after `--` (or in --override) go to the config, e.g. "
        "`-- --trainer.default_root_dir runs/x`.",
    )
    parser.add_argument(
        "--config",
        type=str,
        required=True,
        help="the merge config (the YAML used with `lightning_simo fit`)",
    )
    parser.add_argument(
        "--lambdas",
        type=int,
        default=16,
        help="number of λ points, evenly spaced from 0 (16 up to 1.5 hits 1.0)",
    )
    parser.add_argument("--max_lambda", type=float, default=1.5, help="largest λ")
    parser.add_argument(
        "--split", type=str, default="val", help="split to evaluate on (train, val, test)"
    )
    parser.add_argument(
        "--out",
        type=str | None,
        default=None,
        help="output folder (default <trainer.default_root_dir>/analysis)",
    )
    parser.add_argument(
        "--max_batches", type=int | None, default=None, help="evaluate on at most this many batches"
    )
    parser.add_argument(
        "--override",
        type=list[str],
        default=[],
        help="extra config arguments, e.g. '[--merge.pretrained=x.ckpt]'",
    )
    return parser


def parse_args(args: Sequence[str]) -> tuple[Any, list[str]]:
    """The command's own options, and the config overrides (``--override`` then after ``--``)."""
    argv = list(args)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    options = _parser().parse_args(argv)
    if options.split not in SPLITS:
        raise ValueError(f"--split must be one of {SPLITS}, got {options.split!r}.")
    if options.max_batches is not None and options.max_batches < 1:
        raise ValueError(f"--max_batches must be >= 1, got {options.max_batches}.")
    return options, [*options.override, *extra]


def main(args: list[str] | None = None) -> None:
    """``lightning_simo analyze --config <merge config> [options] [-- config overrides]``."""
    import sys

    options, overrides = parse_args(sys.argv[1:] if args is None else args)
    lambdas = lambda_grid(options.lambdas, options.max_lambda)
    inputs = inputs_from_config(options.config, overrides)
    paths = run_analysis(inputs, options.out, lambdas, options.split, options.max_batches)
    print(f"analysis written to {paths['lambda_sweep.csv'].parent}")
