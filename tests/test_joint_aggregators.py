"""JointMTLModule with gradient aggregators and the new loss weightings.

What the module applies is checked against an independent computation: the encoder's gradient
before the optimiser step is the strategy's direction for the jacobian computed here, task by
task, with plain ``backward``; every head's gradient is its own task's. Every registered method
trains on the tiny model; ``jacobian_of: features`` applies the weights of the feature Gramian to
the parameter gradients; bf16 runs; the per-task cosines and weights reach the logger.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from test_joint import _module as joint_module
from test_joint import _trainer as joint_trainer
from torch import Tensor

from lightning_simo.data.synthetic import SyntheticDataModule
from lightning_simo.models.encoders import EncoderOutput
from lightning_simo.modules.jacobian import task_jacobian
from lightning_simo.modules.joint import JointMTLModule
from lightning_simo.weighting import WEIGHTINGS, build_weighting

TASKS = ["segmentation", "depth", "normals"]
TRAINABLE = [n for n in WEIGHTINGS.names() if n != "nash_mtl"]  # nash_mtl needs cvxpy


def _data(batch_size: int = 4) -> SyntheticDataModule:
    return SyntheticDataModule(
        tasks=TASKS,
        num_train=8,
        num_val=4,
        num_test=4,
        height=32,
        width=40,
        batch_size=batch_size,
        augment=False,
    )


def _module(weighting: str, **kwargs: Any) -> JointMTLModule:
    return joint_module(weighting, schedule="constant", **kwargs)


def _trainer(tmp_path: Path, **kwargs: Any) -> L.Trainer:
    return joint_trainer(tmp_path, **{"max_steps": 2, "limit_val_batches": 0, **kwargs})


class _GradRecorder(L.Callback):
    """Keeps the first step's batch, the weights it started from and the gradients applied."""

    def __init__(self) -> None:
        self.batch: dict[str, Tensor] | None = None
        self.start: dict[str, Tensor] = {}
        self.weighting_state: dict[str, Tensor] = {}
        self.grads: dict[str, Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.batch is None:
            self.batch = {k: v.clone() for k, v in batch.items()}
            self.start = copy.deepcopy(pl_module.state_dict())
            self.weighting_state = copy.deepcopy(pl_module.weighting.state_dict())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.grads:
            self.grads = {
                n: p.grad.detach().clone()
                for n, p in pl_module.named_parameters()
                if p.grad is not None
            }


def _replay(weighting: str, recorder: _GradRecorder, **kwargs: Any):
    """The first step recomputed by hand: (module at the start, losses, encoder jacobian)."""
    module = _module(weighting, **kwargs)
    module.load_state_dict(recorder.start)
    module.train()
    assert recorder.batch is not None
    _, losses = module.task_losses(recorder.batch)
    stacked = torch.stack([losses[t] for t in TASKS])
    shared = module.encoder_parameters()
    jac = torch.stack(
        [
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).reshape(-1)
                    for g, p in zip(
                        torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True),
                        shared,
                    )
                ]
            )
            for loss in stacked
        ]
    )
    return module, losses, stacked.detach(), jac


def _assert_heads_get_own_gradients(module, losses, recorder) -> None:
    for task in TASKS:
        params = dict(module.net.heads[task].named_parameters())
        grads = torch.autograd.grad(losses[task], list(params.values()), retain_graph=True)
        for (name, _), grad in zip(params.items(), grads):
            got = recorder.grads[f"net.heads.{task}.{name}"]
            torch.testing.assert_close(got, grad, rtol=1e-4, atol=1e-7)


def _encoder_grad(module: JointMTLModule, recorder: _GradRecorder) -> Tensor:
    names = [n for n, p in module.net.encoder.named_parameters() if p.requires_grad]
    return torch.cat([recorder.grads[f"net.encoder.{n}"].reshape(-1) for n in names])


@pytest.mark.parametrize("weighting", ["upgrad", "pcgrad", "db_mtl"])
def test_applied_direction_is_the_aggregate_of_the_jacobian(weighting: str, tmp_path) -> None:
    L.seed_everything(0, verbose=False)
    model = _module(weighting, grad_clip=None)
    recorder = _GradRecorder()
    _trainer(tmp_path, max_steps=1, callbacks=[recorder]).fit(model, _data())
    module, losses, stacked, jac = _replay(weighting, recorder, grad_clip=None)
    reference = build_weighting(weighting, TASKS)
    reference.load_state_dict(recorder.weighting_state)
    expected = reference.aggregate(jac, stacked)
    got = _encoder_grad(module, recorder)
    assert (got - expected).norm() <= 1e-4 * expected.norm()
    _assert_heads_get_own_gradients(module, losses, recorder)


def test_features_jacobian_applies_feature_gramian_weights(tmp_path) -> None:
    L.seed_everything(0, verbose=False)
    model = _module("mgda", grad_clip=None, jacobian_of="features", jacobian_chunk=2)
    recorder = _GradRecorder()
    _trainer(tmp_path, max_steps=1, callbacks=[recorder]).fit(model, _data())
    module, losses, stacked, jac = _replay("mgda", recorder)
    # the weights are those of the Gramian of the features' jacobian, computed here
    feats = module.net.encoder(recorder.batch["image"])
    leaves = [f.detach().requires_grad_(True) for f in feats.features]
    tokens = [t.detach().requires_grad_(True) for t in feats.class_tokens or []]
    preds = module.net.forward_heads(EncoderOutput(leaves, tokens or None, feats.image_size))
    head_losses = torch.stack(
        [module.task_specs[t].loss(preds[t], recorder.batch[t]) for t in TASKS]
    )
    feature_jac = task_jacobian(head_losses, leaves + tokens)
    weights = build_weighting("mgda", TASKS).gramian_weights(feature_jac @ feature_jac.T, stacked)
    torch.testing.assert_close(model.weighting.last_weights, weights, rtol=1e-4, atol=1e-6)
    expected = weights @ jac
    assert (_encoder_grad(module, recorder) - expected).norm() <= 1e-4 * expected.norm()
    _assert_heads_get_own_gradients(module, losses, recorder)


def test_jacobian_chunks_give_the_same_rows() -> None:
    x = torch.randn(5, requires_grad=True)
    w = torch.randn(3, 5, requires_grad=True)
    losses = (w @ x).pow(2)
    one = task_jacobian(losses, [x, w], chunk=1)
    batched = task_jacobian(losses, [x, w], chunk=2)
    torch.testing.assert_close(one, batched)
    assert one.dtype == torch.float32 and one.shape == (3, 5 + 15)


@pytest.mark.parametrize("weighting", TRAINABLE)
def test_every_method_trains(weighting: str, tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    model = _module(weighting)
    trainer = _trainer(tmp_path, max_steps=3)
    trainer.fit(model, _data())
    for key in ["train/loss", *(f"train/{t}/loss" for t in TASKS)]:
        assert math.isfinite(float(trainer.callback_metrics[key])), key
    assert trainer.global_step == 3
    assert model.automatic_optimization == (not model.weighting.requires_manual_backward)
    params = [p for p in model.net.encoder.parameters() if p.requires_grad]
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("weighting", ["pcgrad", "graddrop", "cagrad"])
def test_feature_jacobian_fits(weighting: str, tmp_path: Path) -> None:
    model = _module(weighting, jacobian_of="features")
    trainer = _trainer(tmp_path)
    trainer.fit(model, _data())
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


def test_bf16_fit_runs(tmp_path: Path) -> None:
    for options in ({}, {"jacobian_of": "features"}):
        model = _module("upgrad", **options)
        trainer = _trainer(tmp_path, precision="bf16-mixed")
        trainer.fit(model, _data())
        assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
        assert all(p.dtype == torch.float32 for p in model.parameters())


def test_probe_epochs_train_heads_with_their_own_losses(tmp_path: Path) -> None:
    model = _module("upgrad", probe_epochs=1)
    start = copy.deepcopy(model.net.encoder.state_dict())
    _trainer(tmp_path, max_steps=2).fit(model, _data())
    assert all(torch.equal(v, model.net.encoder.state_dict()[k]) for k, v in start.items())
    assert math.isnan(float(model.weighting.last_cosines[0]))  # nothing aggregated yet


class _Logged(L.Callback):
    def __init__(self) -> None:
        self.keys: set[str] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.keys |= set(trainer.callback_metrics)


@pytest.mark.parametrize(
    ("weighting", "expected"),
    [
        ("upgrad", {"weights/cosine/depth", "weights/depth"}),
        ("graddrop", {"weights/cosine/normals"}),
        ("famo", {"weights/segmentation", "weights/famo/z/depth"}),
    ],
)
def test_weights_and_cosines_are_logged(weighting: str, expected: set[str], tmp_path) -> None:
    logged = _Logged()
    _trainer(tmp_path, callbacks=[logged]).fit(_module(weighting), _data())
    assert expected <= logged.keys


def test_famo_updates_its_logits_after_each_step(tmp_path: Path) -> None:
    model = _module("famo")
    _trainer(tmp_path, max_steps=2).fit(model, _data())
    assert int(model.weighting.steps) == 2
    assert not torch.equal(model.weighting.logits, torch.zeros(3))


def test_configuration_errors() -> None:
    with pytest.raises(ValueError, match="jacobian_of"):
        _module("upgrad", jacobian_of="inputs")
    with pytest.raises(ValueError, match="db_mtl.*parameters"):
        _module("db_mtl", jacobian_of="features")
    with pytest.raises(ValueError, match="freeze_encoder"):
        _module("pcgrad", freeze_encoder=True)
