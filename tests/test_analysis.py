"""Task-relationship analysis: the sweep's anchor points, the similarity statistics, the command."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_VIT
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch import Tensor

from lightning_simo import analysis as A
from lightning_simo.checkpoints import encoder_state_dict, load_state_dict
from lightning_simo.cli import main as cli_main
from lightning_simo.data.synthetic import SyntheticDataModule
from lightning_simo.evaluation import evaluate_net
from lightning_simo.merging.sources import sources_from_states
from lightning_simo.modules.simo import SIMOModule

TASKS = ["segmentation", "depth", "normals"]
DATA = {"num_train": 16, "num_val": 8, "num_test": 8, "height": 32, "width": 40, "batch_size": 8}
HEAD = {"kind": "linear", "upsample": 4}


def _datamodule() -> SyntheticDataModule:
    return SyntheticDataModule(tasks=TASKS, augment=False, **DATA)


def _module(dm: SyntheticDataModule, tasks: list[str], checkpoint: str | None = None) -> SIMOModule:
    encoder = {**TINY_VIT, "model_kwargs": dict(TINY_VIT["model_kwargs"]), "checkpoint": checkpoint}
    return SIMOModule(tasks=tasks, num_classes=dm.num_classes, encoder=encoder, head=HEAD)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """θ0 and three single-task checkpoints fine-tuned from it for a few steps."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("analysis_run")
    dm = _datamodule()
    dm.setup("fit")
    theta0_path = folder / "theta0.ckpt"
    torch.save({"state_dict": _module(dm, TASKS).state_dict()}, theta0_path)
    paths = {}
    for task in TASKS:
        module = _module(dm, [task], str(theta0_path))
        optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
        spec = module.task_specs[task]
        for _ in range(3):
            for batch in dm.train_dataloader():
                loss = spec.loss(module.net(batch["image"])[task], batch[task])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        paths[task] = folder / f"{task}.ckpt"
        torch.save({"state_dict": module.state_dict()}, paths[task])
    return {"folder": folder, "theta0": theta0_path, "checkpoints": paths, "dm": dm}


@pytest.fixture(scope="module")
def sweep(run: dict) -> dict:
    dm = run["dm"]
    model = _module(dm, TASKS, str(run["theta0"]))
    theta0 = {k: v.clone() for k, v in model.net.encoder.state_dict().items()}
    finetuned = {t: load_state_dict(p) for t, p in run["checkpoints"].items()}
    loader = dm.loader("val")
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    baseline = A.single_task_baseline(model.net, finetuned, loader, model.task_specs)
    rows = A.lambda_sweep(
        model.net,
        theta0,
        finetuned,
        loader,
        model.task_specs,
        lambdas=[0.0, 0.5, 1.0, 1.5],
        baseline=baseline,
    )
    return {
        "model": model,
        "theta0": theta0,
        "finetuned": finetuned,
        "loader": loader,
        "baseline": baseline,
        "rows": rows,
        "before": before,
    }


def _value(rows: list[dict], source: str, lam: float, task: str, key: str = "value") -> float:
    (row,) = [r for r in rows if (r["source_task"], r["lambda"], r["task"]) == (source, lam, task)]
    return row[key]


# ----------------------------------------------------------------------------- arithmetic
def test_lambda_grid_default_holds_exact_anchor_points() -> None:
    assert len(A.DEFAULT_LAMBDAS) == 16
    assert A.DEFAULT_LAMBDAS[0] == 0.0 and A.DEFAULT_LAMBDAS[-1] == 1.5
    assert 1.0 in A.DEFAULT_LAMBDAS
    assert A.lambda_grid(4, 3.0) == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="at least 2"):
        A.lambda_grid(1)
    with pytest.raises(ValueError, match="max_lambda"):
        A.lambda_grid(4, float("nan"))


def test_add_task_vector_is_exact_at_both_anchors() -> None:
    gen = torch.Generator().manual_seed(0)
    # weights spread over eight decades, each fine-tuned within a factor 4 of itself
    a = torch.randn(4096, generator=gen) * 10.0 ** torch.randint(-6, 3, (4096,), generator=gen)
    b = (
        a
        * (0.25 + 3.75 * torch.rand(4096, generator=gen))
        * torch.randn(4096, generator=gen).sign()
    )
    assert not torch.equal(a + (b - a), b)  # float32 arithmetic would not be exact
    theta0 = {"w": a, "step": torch.tensor(3)}
    theta_t = {"w": b, "step": torch.tensor(9)}
    assert torch.equal(A.add_task_vector(theta0, theta_t, 1.0)["w"], b)
    assert torch.equal(A.add_task_vector(theta0, theta_t, 0.0)["w"], a)
    half = A.add_task_vector(theta0, theta_t, 0.5)
    assert half["w"].dtype == torch.float32
    torch.testing.assert_close(half["w"], (a.double() + b.double()).div(2).float())
    assert half["step"].item() == 3  # integer buffers are θ0's


def test_add_task_vector_keeps_running_var_non_negative() -> None:
    theta0 = {"bn.running_var": torch.tensor([1.0, 0.5]), "bn.running_mean": torch.tensor([1.0])}
    theta_t = {"bn.running_var": torch.tensor([0.2, 0.5]), "bn.running_mean": torch.tensor([0.0])}
    out = A.add_task_vector(theta0, theta_t, 1.5)
    assert out["bn.running_var"].tolist() == [0.0, 0.5]
    assert out["bn.running_mean"].tolist() == [-0.5]


# ----------------------------------------------------------------------------- sweep invariants
def test_sweep_rows(sweep: dict) -> None:
    rows = sweep["rows"]
    assert len(rows) == 3 * 4 * 3
    assert set(rows[0]) == {"source_task", "lambda", "task", "metric", "value", "normalized"}
    assert {r["metric"] for r in rows if r["task"] == "segmentation"} == {"miou"}
    assert {r["metric"] for r in rows if r["task"] == "depth"} == {"abs_err"}


def test_sweep_at_lambda_zero_is_theta0_with_finetuned_heads(sweep: dict) -> None:
    model, rows = sweep["model"], sweep["rows"]
    net = model.net
    net.encoder.load_state_dict(sweep["theta0"])
    sources_from_states(list(TASKS), sweep["theta0"], sweep["finetuned"]).attach_heads(net)
    expected = evaluate_net(net, sweep["loader"], model.task_specs)
    net.load_state_dict(sweep["before"])
    for task, spec in model.task_specs.items():
        values = {_value(rows, source, 0.0, task) for source in TASKS}
        assert values == {expected[f"{task}/{spec.primary}"]}, task


def test_sweep_at_lambda_one_reproduces_own_model(sweep: dict) -> None:
    rows, baseline = sweep["rows"], sweep["baseline"]
    for task in TASKS:
        assert _value(rows, task, 1.0, task, "normalized") == 1.0
        primary = sweep["model"].task_specs[task].primary
        assert _value(rows, task, 1.0, task) == baseline[f"{task}/{primary}"]


def test_sweep_moves_away_from_theta0_and_normalises_by_direction(sweep: dict) -> None:
    rows, baseline = sweep["rows"], sweep["baseline"]
    assert _value(rows, "depth", 0.0, "depth") != _value(rows, "depth", 1.0, "depth")
    value = _value(rows, "segmentation", 0.5, "depth")
    assert _value(rows, "segmentation", 0.5, "depth", "normalized") == pytest.approx(
        baseline["depth/abs_err"] / value
    )  # lower is better: baseline / value
    miou = _value(rows, "depth", 0.5, "segmentation")
    assert _value(rows, "depth", 0.5, "segmentation", "normalized") == pytest.approx(
        miou / baseline["segmentation/miou"]
    )


def test_sweep_restores_the_net(sweep: dict) -> None:
    after = sweep["model"].net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in sweep["before"].items())


def test_sweep_needs_heads(sweep: dict) -> None:
    encoder_only = {t: encoder_state_dict(s) for t, s in sweep["finetuned"].items()}
    with pytest.raises(ValueError, match="no head for 'segmentation'"):
        A.lambda_sweep(
            sweep["model"].net,
            sweep["theta0"],
            encoder_only,
            sweep["loader"],
            sweep["model"].task_specs,
            lambdas=[0.0],
            baseline=sweep["baseline"],
        )


# ----------------------------------------------------------------------------- similarity
def test_task_vector_similarity(sweep: dict) -> None:
    names, cos, lengths = A.task_vector_similarity(sweep["theta0"], sweep["finetuned"])
    assert names == TASKS
    assert cos.shape == (3, 3) and lengths.shape == (3,)
    torch.testing.assert_close(cos.diagonal(), torch.ones(3, dtype=torch.float64))
    assert torch.equal(cos, cos.T)
    assert (cos.abs() <= 1).all() and (lengths > 0).all()

    def flat(task: str) -> Tensor:
        enc = encoder_state_dict(sweep["finetuned"][task])
        return torch.cat(
            [(enc[k].double() - v.double()).flatten() for k, v in sweep["theta0"].items()]
        )

    vectors = {t: flat(t) for t in TASKS}
    torch.testing.assert_close(lengths[1], vectors["depth"].norm())
    expected = torch.dot(vectors["depth"], vectors["normals"]) / (
        vectors["depth"].norm() * vectors["normals"].norm()
    )
    torch.testing.assert_close(cos[1, 2], expected)


# ----------------------------------------------------------------------------- figures
def test_plot_lambda_sweep(sweep: dict) -> None:
    fig = A.plot_lambda_sweep(sweep["rows"])
    assert isinstance(fig, Figure)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == [f"θ0 + λ·τ_{t}" for t in TASKS]
    for ax in axes:
        curves = [line for line in ax.get_lines() if line.get_label() in TASKS]
        assert [c.get_label() for c in curves] == TASKS
        assert list(curves[0].get_xdata()) == [0.0, 0.5, 1.0, 1.5]
        dashed = [
            line
            for line in ax.get_lines()
            if isinstance(line, Line2D) and line.get_linestyle() == "--"
        ]
        assert [list(line.get_ydata()) for line in dashed] == [[1.0, 1.0]]
    with pytest.raises(ValueError):
        A.plot_lambda_sweep([])


def test_plot_similarity() -> None:
    cos = torch.tensor([[1.0, 0.25], [0.25, 1.0]])
    fig = A.plot_similarity(cos, torch.tensor([2.0, 0.5]), ["a", "b"])
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == ["0.25", "0.25", "1.00", "1.00"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a\n‖τ‖=2", "b\n‖τ‖=0.5"]
    with pytest.raises(ValueError, match="2 names"):
        A.plot_similarity(cos, torch.tensor([1.0]), ["a", "b"])


# ----------------------------------------------------------------------------- command
def test_parse_args_collects_overrides() -> None:
    options, overrides = A.parse_args(
        ["--config", "m.yaml", "--lambdas", "4", "--override", "[--a=1]", "--", "--b", "2"]
    )
    assert (options.config, options.lambdas, options.max_lambda, options.split) == (
        "m.yaml",
        4,
        1.5,
        "val",
    )
    assert overrides == ["--a=1", "--b", "2"]
    with pytest.raises(ValueError, match="max_batches"):
        A.parse_args(["--config", "m.yaml", "--max_batches", "0"])
    with pytest.raises(ValueError, match="--split must be one of"):
        A.parse_args(["--config", "m.yaml", "--split", "training"])


def _merge_yaml(run: dict, root: Path, with_merge: bool = True) -> Path:
    vit = TINY_VIT["model_kwargs"]
    checkpoints = "\n".join(f"    {t}: {p}" for t, p in run["checkpoints"].items())
    merge = f"merge:\n  checkpoints:\n{checkpoints}\n  scaling: 1.0\n" if with_merge else ""
    text = f"""\
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  default_root_dir: {root}
  logger: false
  enable_checkpointing: false
{merge}model:
  class_path: lightning_simo.modules.simo.SIMOModule
  init_args:
    encoder:
      name: {TINY_VIT["name"]}
      model_kwargs: {{patch_size: {vit["patch_size"]}, embed_dim: {vit["embed_dim"]}, depth: {vit["depth"]}, num_heads: {vit["num_heads"]}, img_size: {vit["img_size"]}}}
      indices: {TINY_VIT["indices"]}
      checkpoint: {run["theta0"]}
    head: {{kind: linear, upsample: 4}}
data:
  class_path: lightning_simo.data.synthetic.SyntheticDataModule
  init_args:
    tasks: {TASKS}
    num_train: 16
    num_val: 8
    num_test: 8
    height: 32
    width: 40
    augment: false
    batch_size: 8
"""
    path = root / ("merge.yaml" if with_merge else "plain.yaml")
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command as a user would start it (not pytest's own arguments)."""
    monkeypatch.setattr(sys, "argv", ["lightning_simo"])


@pytest.mark.usefixtures("argv")
def test_analyze_command_writes_tables_and_figures(run: dict, tmp_path: Path) -> None:
    config = _merge_yaml(run, tmp_path / "cfg")
    root = tmp_path / "elsewhere"
    cli_main(
        [
            "analyze",
            "--config",
            str(config),
            "--lambdas",
            "4",
            "--max_lambda",
            "1.5",
            "--max_batches",
            "1",
            "--",
            f"--trainer.default_root_dir={root}",
        ]
    )
    out = root / "analysis"
    assert sorted(p.name for p in out.iterdir()) == [
        "lambda_sweep.csv",
        "lambda_sweep.png",
        "task_vectors.csv",
        "task_vectors.png",
        "tb",
    ]
    assert list((out / "tb").glob("events.out.tfevents.*"))
    for png in ("lambda_sweep.png", "task_vectors.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with open(out / "lambda_sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 4 * 3
    assert {r["lambda"] for r in rows} == {"0.0", "0.5", "1.0", "1.5"}
    own = [r for r in rows if r["lambda"] == "1.0" and r["task"] == r["source_task"]]
    assert [float(r["normalized"]) for r in own] == [1.0, 1.0, 1.0]
    for task in TASKS:
        at_zero = {r["value"] for r in rows if r["lambda"] == "0.0" and r["task"] == task}
        assert len(at_zero) == 1

    with open(out / "task_vectors.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["task"] for r in table] == TASKS
    assert list(table[0]) == ["task", "norm", "cos_segmentation", "cos_depth", "cos_normals"]
    for i, r in enumerate(table):
        assert float(r[f"cos_{TASKS[i]}"]) == pytest.approx(1.0)
        assert float(r["norm"]) > 0
        assert r["cos_depth"] == table[1][f"cos_{r['task']}"]


@pytest.mark.usefixtures("argv")
def test_analyze_command_needs_merge_checkpoints(
    run: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _merge_yaml(run, tmp_path, with_merge=False)
    with pytest.raises(SystemExit) as exc:
        cli_main(["analyze", "--config", str(config)])
    assert exc.value.code == 2
    assert "analyze needs merge.checkpoints" in capsys.readouterr().err
