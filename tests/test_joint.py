"""JointMTLModule: every weighting trains, state survives checkpoints, the CLI runs end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import TINY_VIT, cpu_trainer, tiny_datamodule, tiny_module

from lightning_simo.data.synthetic import SyntheticDataModule
from lightning_simo.modules.joint import JointMTLModule

TASKS = ["segmentation", "depth", "normals"]
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "synthetic" / "mtl.yaml"


def _data() -> SyntheticDataModule:
    return tiny_datamodule(TASKS)


def _module(weighting: str, **kwargs: Any) -> JointMTLModule:
    kwargs.setdefault("lr", 1e-3)
    return tiny_module(
        TASKS, JointMTLModule, head={"kind": "linear"}, weighting=weighting, **kwargs
    )


def _trainer(tmp_path: Path, **kwargs: Any) -> L.Trainer:
    return cpu_trainer(tmp_path, **{"max_epochs": 2, "limit_val_batches": 1, **kwargs})


class _Recorder(L.Callback):
    """Records the task weights and the model's gradient norm after every optimiser step."""

    def __init__(self) -> None:
        self.before: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []
        self.grad_norms: list[float] = []
        self.logged: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        w = pl_module.weighting.weights()
        self.before.append(torch.tensor([w[t] for t in TASKS]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        w = pl_module.weighting.weights()
        self.weights.append(torch.tensor([w[t] for t in TASKS]))
        grads = [p.grad.float().pow(2).sum() for p in pl_module.parameters() if p.grad is not None]
        self.grad_norms.append(float(torch.stack(grads).sum().sqrt()))
        self.logged.append({t: float(trainer.callback_metrics[f"weights/{t}"]) for t in TASKS})


def _finite_losses(trainer: L.Trainer) -> None:
    for key in ["train/loss", "val/loss", *(f"train/{t}/loss" for t in TASKS)]:
        assert math.isfinite(float(trainer.callback_metrics[key])), key


# ----------------------------------------------------------------------------- each weighting
@pytest.mark.parametrize("weighting", ["equal", "uncertainty", "gradnorm", "dwa"])
def test_each_weighting_trains_with_finite_losses(weighting: str, tmp_path: Path) -> None:
    model = _module(weighting)
    recorder = _Recorder()
    trainer = _trainer(tmp_path, callbacks=[recorder])
    trainer.fit(model, _data())
    assert trainer.global_step == 4  # 2 epochs x 2 batches, also under manual optimisation
    assert model.automatic_optimization == (weighting != "gradnorm")
    _finite_losses(trainer)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # weights/<task>, logged every step, is the weight applied in that step
    assert len(recorder.logged) == 4
    for logged, weights in zip(recorder.logged, recorder.before):
        assert [logged[t] for t in TASKS] == pytest.approx(weights.tolist(), rel=1e-6)
    # val/loss is the unweighted mean of the task losses whatever the weighting
    val = [float(trainer.callback_metrics[f"val/{t}/loss"]) for t in TASKS]
    assert float(trainer.callback_metrics["val/loss"]) == pytest.approx(sum(val) / 3, rel=1e-5)
    # the one-cycle schedule advanced once per optimiser step
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 4


def test_gradnorm_weights_sum_to_task_count_and_move(tmp_path: Path) -> None:
    model = _module("gradnorm")
    recorder = _Recorder()
    _trainer(tmp_path, max_epochs=3, callbacks=[recorder]).fit(model, _data())
    assert len(recorder.weights) == 6
    for w in recorder.weights:
        assert float(w.sum()) == pytest.approx(3.0, abs=1e-5)
    final = recorder.weights[-1]
    assert (final - 1).abs().min() > 1e-3  # every weight left 1
    state = model.weighting
    assert bool(state.has_initial_losses)
    assert int(state.opt_step) == 6
    assert (state.initial_losses > 0).all()
    assert set(model.weighting.extra_logs()) >= {"gradnorm/loss", "gradnorm/grad_norm/depth"}


def test_gradnorm_waits_for_the_encoder_to_train(tmp_path: Path) -> None:
    """During the linear probe the encoder gets no gradient: weights stay 1, L(0) unset."""
    model = _module("gradnorm", probe_epochs=1)
    recorder = _Recorder()
    _trainer(tmp_path, callbacks=[recorder]).fit(model, _data())
    assert torch.equal(recorder.weights[0], torch.ones(3))
    assert torch.equal(recorder.weights[1], torch.ones(3))
    assert (recorder.weights[-1] - 1).abs().max() > 1e-3
    assert int(model.weighting.opt_step) == 2  # the two fine-tuning steps only


def test_gradnorm_shared_layer_is_the_deepest_block_read() -> None:
    model = _module("gradnorm", encoder={**TINY_VIT, "indices": [0, 2]})
    block = model.net.encoder.block_modules()[2]
    assert [id(p) for p in model.shared_parameters()] == [id(p) for p in block.parameters()]


def test_uncertainty_log_var_trains_in_its_own_group(tmp_path: Path) -> None:
    model = _module("uncertainty", weight_decay=0.5, head_lr=2e-3)
    groups = {g["name"]: g for g in model.parameter_groups()}
    assert set(groups) == {"encoder", "heads", "weighting"}
    assert groups["weighting"]["params"] == [model.weighting.log_var]
    assert groups["weighting"]["weight_decay"] == 0.0
    assert groups["weighting"]["lr"] == 2e-3
    assert all(p is not model.weighting.log_var for p in groups["encoder"]["params"])
    _trainer(tmp_path).fit(model, _data())
    log_var = model.weighting.log_var.detach()
    assert (log_var.abs() > 1e-4).all()
    # the regression tasks' weight is 1/2 e^{-s}, the classification task's e^{-s}
    w = model.weighting.weights()
    assert w["depth"] == pytest.approx(0.5 * math.exp(-float(log_var[1])), rel=1e-6)
    assert w["segmentation"] == pytest.approx(math.exp(-float(log_var[0])), rel=1e-6)


def test_dwa_weights_follow_the_epoch_loss_ratios(tmp_path: Path) -> None:
    model = _module("dwa")
    trainer = _trainer(tmp_path, max_epochs=3)
    trainer.fit(model, _data())
    dwa = model.weighting
    assert int(dwa.epochs_seen) == 3
    # the last epoch's average equals what Lightning logged (equal batch sizes)
    logged = torch.tensor([float(trainer.callback_metrics[f"train/{t}/loss"]) for t in TASKS])
    torch.testing.assert_close(dwa.loss_history[1], logged, rtol=1e-5, atol=1e-6)
    expected = 3 * torch.softmax(dwa.loss_history[1] / dwa.loss_history[0] / 2.0, dim=0)
    torch.testing.assert_close(dwa.task_weights, expected)
    assert (dwa.task_weights - 1).abs().max() > 1e-4
    assert float(dwa.task_weights.sum()) == pytest.approx(3.0, abs=1e-5)


# ----------------------------------------------------------------------------- clipping
@pytest.mark.parametrize("weighting", ["equal", "gradnorm"])
def test_grad_clip_bounds_the_gradient_norm(weighting: str, tmp_path: Path) -> None:
    clipped, free = _Recorder(), _Recorder()
    _trainer(tmp_path, max_steps=1, callbacks=[clipped]).fit(
        _module(weighting, grad_clip=1e-3), _data()
    )
    _trainer(tmp_path, max_steps=1, callbacks=[free]).fit(
        _module(weighting, grad_clip=None), _data()
    )
    assert len(clipped.grad_norms) == len(free.grad_norms) == 1
    assert max(clipped.grad_norms) <= 1e-3 * (1 + 1e-4)
    assert min(free.grad_norms) > 1e-2


def test_trainer_side_clipping_is_refused(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, max_steps=1, gradient_clip_val=1.0)
    with pytest.raises(ValueError, match="model.grad_clip"):
        trainer.fit(_module("equal"), _data())


def test_configuration_errors() -> None:
    with pytest.raises(ValueError, match="valid names: .*dwa, equal, .*gradnorm, .*upgrad"):
        _module("pcgrad2")
    with pytest.raises(ValueError, match="do not fit weighting 'dwa'"):
        _module("dwa", weighting_options={"alpha": 1.5})
    with pytest.raises(ValueError, match="freeze_encoder"):
        _module("gradnorm", freeze_encoder=True)
    with pytest.raises(ValueError, match="grad_clip"):
        _module("equal", grad_clip=0.0)
    model = _module("gradnorm", weighting_options={"alpha": 0.5, "initial_loss": "first_epoch"})
    assert model.weighting.alpha == 0.5
    assert model.hparams.weighting_options == {"alpha": 0.5, "initial_loss": "first_epoch"}


# ----------------------------------------------------------------------------- checkpoints
def test_gradnorm_state_survives_a_checkpoint(tmp_path: Path) -> None:
    # a constant schedule, so that the resumed run may be longer than the one-cycle planned
    model = _module("gradnorm", schedule="constant")
    trainer = _trainer(tmp_path)
    trainer.fit(model, _data())
    path = tmp_path / "joint.ckpt"
    trainer.save_checkpoint(path)
    saved = {k: v.clone() for k, v in model.weighting.state_dict().items()}
    assert {"task_weights", "initial_losses", "exp_avg", "opt_step"} <= set(saved)

    loaded = JointMTLModule.load_from_checkpoint(path)
    assert loaded.hparams.weighting == "gradnorm"
    for key, value in loaded.weighting.state_dict().items():
        assert torch.equal(value, saved[key]), key

    class AtStart(L.Callback):
        weights: torch.Tensor

        def on_train_start(self, trainer, pl_module) -> None:
            self.weights = pl_module.weighting.task_weights.clone()
            self.initial = pl_module.weighting.initial_losses.clone()

    at_start = AtStart()
    resumed = _module("gradnorm", schedule="constant")
    _trainer(tmp_path, max_epochs=3, callbacks=[at_start]).fit(resumed, _data(), ckpt_path=path)
    assert torch.equal(at_start.weights, saved["task_weights"])
    assert torch.equal(at_start.initial, saved["initial_losses"])
    assert torch.equal(resumed.weighting.initial_losses, saved["initial_losses"])  # kept L(0)
    assert int(resumed.weighting.opt_step) == 6  # 4 steps before the restart, 2 after


# ----------------------------------------------------------------------------- precision
@pytest.mark.parametrize("weighting", ["gradnorm", "uncertainty"])
def test_bf16_mixed_smoke(weighting: str, tmp_path: Path) -> None:
    model = _module(weighting)
    _trainer(tmp_path, max_epochs=1, precision="bf16-mixed").fit(model, _data())
    weights = torch.tensor(list(model.weighting.weights().values()))
    assert torch.isfinite(weights).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if weighting == "gradnorm":
        assert float(weights.sum()) == pytest.approx(3.0, abs=1e-5)
        assert (weights - 1).abs().max() > 1e-3
        assert math.isfinite(model.weighting.extra_logs()["gradnorm/loss"])


# ----------------------------------------------------------------------------- command line
@pytest.mark.slow
def test_cli_fit_then_test_reports_delta_mtl(tmp_path: Path) -> None:
    from lightning_simo.cli import main

    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(
        "trainer: {max_epochs: 2, accelerator: cpu, enable_progress_bar: false, "
        "limit_val_batches: 1}\n"
        "model:\n  init_args:\n    encoder:\n      checkpoint: null\n"
        f"      model_kwargs: {json.dumps(TINY_VIT['model_kwargs'])}\n"
        f"      indices: {TINY_VIT['indices']}\n"
        "data:\n  init_args: {num_train: 16, num_val: 8, num_test: 8, height: 32, width: 40, "
        "batch_size: 8}\n"
    )
    reference = tmp_path / "single_task_metrics.json"
    reference.write_text(
        json.dumps(
            {"metrics": {"segmentation/miou": 0.5, "depth/abs_err": 0.5, "normals/mean": 30.0}}
        )
    )
    root = tmp_path / "mtl" / "gradnorm"
    common = [
        "--config",
        str(CONFIG),
        "--config",
        str(tiny),
        "--model.weighting",
        "gradnorm",
        "--trainer.default_root_dir",
        str(root),
    ]
    # no reference at fit: `test` must take the one given now over the checkpoint's
    main(["fit", *common, "--model.reference_metrics", "[]"])
    ckpt = root / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    weights = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"][
        "weighting.task_weights"
    ]
    assert float(weights.sum()) == pytest.approx(3.0, abs=1e-5)

    main(["test", *common, "--ckpt_path", str(ckpt), "--model.reference_metrics", f"[{reference}]"])
    result = json.loads((root / "test_metrics.json").read_text())
    assert result["tasks"] == TASKS
    metrics = result["metrics"]
    for key in ["segmentation/miou", "segmentation/pixel_acc", "depth/abs_err", "normals/mean"]:
        assert math.isfinite(metrics[key]), key
    base = {"segmentation/miou": 0.5, "depth/abs_err": 0.5, "normals/mean": 30.0}
    m = {k: metrics[k] for k in base}
    ratio = [m["segmentation/miou"] / 0.5, 0.5 / m["depth/abs_err"], 30.0 / m["normals/mean"]]
    difference = [
        (m["segmentation/miou"] - 0.5) / 0.5,
        -(m["depth/abs_err"] - 0.5) / 0.5,
        -(m["normals/mean"] - 30.0) / 30.0,
    ]
    assert metrics["delta_mtl_ratio"] == pytest.approx(100 * (sum(ratio) / 3 - 1), rel=1e-5)
    assert metrics["delta_mtl_difference"] == pytest.approx(100 * sum(difference) / 3, rel=1e-5)
    assert metrics["depth/normalized"] == pytest.approx(ratio[1], rel=1e-5)
    assert set(metrics) >= {f"{t}/normalized" for t in TASKS}
