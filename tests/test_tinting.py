"""Model Tinting for dense tasks: the confidence filter, what trains, label-freedom, the CLI run.

Three single-task models are fine-tuned briefly from one θ0 in a module-scoped fixture (plain
Adam loops, no Trainer) and saved as ``{"state_dict": ...}`` files, so every test merges real task
vectors with real teachers in seconds.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import lightning as L
import pytest
import torch
from conftest import (
    TINY_HEAD,
    TINY_SCENES,
    TINY_VIT,
    SingleTasks,
    cpu_trainer,
    make_single_tasks,
    tiny_datamodule,
    tiny_module,
)
from torch import Tensor
from torch.utils.data import Dataset

from lightning_simo.callbacks.merge import MergeCallback
from lightning_simo.checkpoints import encoder_state_dict, load_state_dict
from lightning_simo.cli import main
from lightning_simo.data.synthetic import SyntheticDataModule
from lightning_simo.merging.cache import SampleCache
from lightning_simo.modules.simo import SIMOModule
from lightning_simo.modules.tinting import (
    TintingModule,
    confidence_filter,
    task_order,
    teacher_targets,
    tint_loss,
)
from lightning_simo.tasks import build_task

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("segmentation", "depth", "normals")
HEAD = TINY_HEAD
SPEC = {
    name: build_task(name, num_classes=2) for name in ("segmentation", "depth", "normals", "edges")
}
DATA = TINY_SCENES


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def single(single_tasks: SingleTasks) -> SingleTasks:
    """The session's θ0 and 20-step single-task models (tests/conftest.py)."""
    return single_tasks


def _datamodule(**overrides: Any) -> SyntheticDataModule:
    return tiny_datamodule(TASKS, **{"augment": False, "train_split": "val", **overrides})


def _callback(single: SingleTasks, realign: str = "tinting") -> MergeCallback:
    return MergeCallback(
        checkpoints=single.checkpoints, scaling=0.3, realign=realign, pretrained=str(single.theta0)
    )


def _module(**kwargs: Any) -> TintingModule:
    return tiny_module(TASKS, TintingModule, **kwargs)


def _set_up(single: SingleTasks, realign: str = "tinting", **kwargs: Any) -> TintingModule:
    """A module merged and configured by the MergeCallback, without training."""
    module = _module(**kwargs)
    _callback(single, realign).setup(cpu_trainer(), module, "fit")
    return module


class _GarbageTargets(Dataset):
    """The same images and indices, with every task target replaced by random values."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        sample = dict(self.dataset[i])
        g = torch.Generator().manual_seed(1000 + i)
        for key, value in sample.items():
            if key in TASKS:
                if value.is_floating_point():
                    sample[key] = torch.randn(value.shape, generator=g) * 5
                else:
                    sample[key] = torch.randint(-1, 8, value.shape, generator=g)
        return sample


class _GarbageDataModule(SyntheticDataModule):
    def make_dataset(self, split: str, train: bool) -> Dataset:
        return _GarbageTargets(super().make_dataset(split, train))


def _fit(
    single: SingleTasks, dm: SyntheticDataModule, epochs: int = 2, **kwargs: Any
) -> tuple[TintingModule, L.Trainer]:
    L.seed_everything(0)
    module = _module(**kwargs)
    trainer = cpu_trainer(max_epochs=epochs, callbacks=[_callback(single)], limit_val_batches=0)
    trainer.fit(module, dm)
    return module, trainer


@pytest.fixture(scope="module")
def fitted(single: SingleTasks) -> tuple[TintingModule, L.Trainer]:
    """Tinting with a large coefficient learning rate, so λ runs into the bounds."""
    return _fit(single, _datamodule(), lr_coefficients=1.0)


def _trained_state(module: TintingModule) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------- confidence filter
def _logits(*pixels: tuple[float, float]) -> Tensor:
    """Two-class logits ``1 x 2 x 1 x N``, one (class 0, class 1) pair per pixel."""
    return torch.tensor(pixels, dtype=torch.float32).T.reshape(1, 2, 1, -1)


def test_filter_keeps_pixels_where_the_models_agree() -> None:
    teacher = _logits((3.0, 0.0), (0.0, 0.5))
    student = _logits((9.0, 0.0), (0.0, 9.0))  # same argmax, student far more confident
    targets, keep = confidence_filter(student, teacher)
    assert targets.tolist() == [[[0, 1]]]
    assert targets.dtype == torch.int64
    assert keep.tolist() == [[[True, True]]]


def test_filter_keeps_disagreement_when_teacher_is_more_confident() -> None:
    teacher = _logits((4.0, 0.0))  # class 0 with p = 0.982
    student = _logits((0.0, 1.0))  # class 1 with p = 0.731
    targets, keep = confidence_filter(student, teacher)
    assert targets.tolist() == [[[0]]]
    assert keep.tolist() == [[[True]]]


def test_filter_keeps_disagreement_at_equal_confidence() -> None:
    targets, keep = confidence_filter(_logits((0.0, 2.0)), _logits((2.0, 0.0)))
    assert targets.tolist() == [[[0]]] and keep.tolist() == [[[True]]]


def test_filter_drops_disagreement_when_merged_model_is_more_confident() -> None:
    teacher = _logits((1.0, 0.0))  # class 0 with p = 0.731
    student = _logits((0.0, 4.0))  # class 1 with p = 0.982
    targets, keep = confidence_filter(student, teacher)
    assert targets.tolist() == [[[0]]]
    assert keep.tolist() == [[[False]]]


def test_segmentation_loss_is_cross_entropy_over_kept_pixels() -> None:
    teacher = _logits((4.0, 0.0), (1.0, 0.0))
    student = _logits((0.0, 1.0), (0.0, 4.0))  # pixel 0 kept (teacher surer), pixel 1 dropped
    student.requires_grad_(True)
    loss, kept = tint_loss(
        SPEC["segmentation"], student, teacher_targets(SPEC["segmentation"], teacher)
    )
    expected = math.log(1 + math.e)  # -log softmax((0, 1))[0]
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert kept.item() == pytest.approx(0.5)
    loss.backward()
    assert torch.all(student.grad[..., 1] == 0)  # the dropped pixel gives no gradient


def test_without_the_filter_segmentation_trains_on_every_pixel() -> None:
    teacher = _logits((4.0, 0.0), (1.0, 0.0))
    student = _logits((0.0, 1.0), (0.0, 4.0))  # the filter would drop pixel 1
    student.requires_grad_(True)
    targets = teacher_targets(SPEC["segmentation"], teacher)
    loss, kept = tint_loss(SPEC["segmentation"], student, targets, filtered=False)
    expected = (math.log(1 + math.e) + math.log(1 + math.e**4)) / 2  # both pixels, class 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert kept.item() == 1.0
    loss.backward()
    assert torch.all(student.grad != 0)  # every pixel gives a gradient
    # tasks without a filter are the same either way
    depth = teacher_targets(SPEC["depth"], teacher[:, :1])
    assert tint_loss(SPEC["depth"], student[:, :1], depth, filtered=False)[1] is None


def test_tinting_without_the_filter_keeps_every_pixel_in_training(single: SingleTasks) -> None:
    module, trainer = _fit(single, _datamodule(), epochs=1, confidence_filter=False)
    assert module.filtered is False
    assert float(trainer.callback_metrics["train/segmentation/kept_fraction"]) == 1.0


def test_segmentation_loss_is_zero_not_nan_when_nothing_is_kept() -> None:
    teacher = _logits((1.0, 0.0), (0.0, 1.0))
    student = _logits((0.0, 6.0), (6.0, 0.0))
    student.requires_grad_(True)
    _, keep = confidence_filter(student, teacher)
    assert not keep.any()
    loss, kept = tint_loss(
        SPEC["segmentation"], student, teacher_targets(SPEC["segmentation"], teacher)
    )
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert kept.item() == 0.0
    loss.backward()
    assert torch.all(student.grad == 0)


def test_regression_losses_against_teacher_outputs() -> None:
    student = torch.tensor([[[[1.0, 2.0]]]])
    teacher = torch.tensor([[[[1.5, 4.0]]]])
    loss, kept = tint_loss(SPEC["depth"], student, teacher_targets(SPEC["depth"], teacher))
    assert loss.item() == pytest.approx(1.25) and kept is None
    # normals: 1 - cos against the normalised teacher (its length does not matter)
    s = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    t = torch.tensor([0.0, 5.0, 5.0]).view(1, 3, 1, 1)
    loss, _ = tint_loss(SPEC["normals"], s, teacher_targets(SPEC["normals"], t))
    assert loss.item() == pytest.approx(1.0)
    loss, _ = tint_loss(SPEC["normals"], s * 3, teacher_targets(SPEC["normals"], s))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    # edges: BCE to the teacher's sigmoid, smallest where the student equals the teacher
    logits = torch.tensor([0.0, 2.0]).view(1, 1, 1, 2)
    at_teacher, _ = tint_loss(SPEC["edges"], logits, teacher_targets(SPEC["edges"], logits))
    off_teacher, _ = tint_loss(SPEC["edges"], logits + 1, teacher_targets(SPEC["edges"], logits))
    p = torch.sigmoid(logits)
    entropy = -(p * p.log() + (1 - p) * (1 - p).log()).mean()
    assert at_teacher.item() == pytest.approx(entropy.item(), rel=1e-5)
    assert off_teacher.item() > at_teacher.item()


def test_task_order_is_a_permutation_fixed_by_the_step() -> None:
    tasks = ["a", "b", "c", "d", "e"]
    orders = [task_order(tasks, step) for step in range(20)]
    assert all(sorted(o) == tasks for o in orders)
    assert orders == [task_order(tasks, step) for step in range(20)]
    assert len({tuple(o) for o in orders}) > 1


# ----------------------------------------------------------------------------- set-up
def _float_encoder_tensors(module: TintingModule) -> int:
    return sum(
        1
        for n, p in module.net.encoder.named_parameters()
        if n.startswith("backbone.") and p.is_floating_point()
    )


def test_tinting_trains_exactly_the_coefficients_and_the_tinted_layers(
    single: SingleTasks,
) -> None:
    module = _set_up(single, "tinting")
    trainable = {n: p.numel() for n, p in module.named_parameters() if p.requires_grad}
    n_tensors = _float_encoder_tensors(module)
    assert n_tensors == 54  # tiny ViT: 4 embedding tensors + 4 blocks x 12 + final norm 2
    tinted = {f"net.heads.{t}.out.{w}" for t in TASKS for w in ("weight", "bias")}
    assert set(trainable) == {"layer_merge.coefficients"} | tinted
    assert trainable["layer_merge.coefficients"] == len(TASKS) * n_tensors
    # 1x1 convs over 4 levels x (32 + 32 class token) = 256 channels, 16 sub-pixels (upsample 4)
    width, sub = 256, 16
    expected_tinted = sum((width + 1) * c * sub for c in (8, 1, 3))
    assert sum(trainable[k] for k in tinted) == expected_tinted == 49_344
    assert module.trainable_parameters() == 3 * 54 + 49_344
    frozen = [n for n, _ in module.named_parameters() if n not in trainable]
    assert len(frozen) == n_tensors + 2 * len(TASKS)  # the encoder and each head's BatchNorm
    assert module.layer_merge.coefficients.eq(0.3).all()


def test_adamerging_trains_only_the_coefficients(single: SingleTasks) -> None:
    module = _set_up(single, "adamerging", coefficient_init=0.5)
    trainable = {n: p.numel() for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"layer_merge.coefficients": len(TASKS) * _float_encoder_tensors(module)}
    assert module.layer_merge.coefficients.eq(0.5).all()
    optimizer = module.configure_optimizers()
    assert [g["name"] for g in optimizer.param_groups] == ["coefficients"]


def test_tinting_needs_the_tinting_module(single: SingleTasks) -> None:
    module = SIMOModule(
        tasks=list(TASKS), num_classes={"segmentation": 8}, encoder=TINY_VIT, head=HEAD
    )
    with pytest.raises(
        ValueError,
        match="realign: tinting needs model class lightning_simo.modules.tinting.TintingModule",
    ):
        _callback(single, "tinting").setup(cpu_trainer(), module, "fit")


def test_unknown_tint_layer_is_refused(single: SingleTasks) -> None:
    with pytest.raises(ValueError, match="no layer 'proj' to tint.*norm.*out"):
        _set_up(single, tint_layer="proj")


def test_any_head_layer_can_be_tinted(single: SingleTasks) -> None:
    module = _set_up(single, tint_layer="norm")
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert {f"net.heads.segmentation.norm.{w}" for w in ("weight", "bias")} <= trainable
    assert not any(".out." in n for n in trainable)


def test_before_training_the_merge_is_task_arithmetic_and_teachers_are_the_single_models(
    single: SingleTasks,
) -> None:
    module = _set_up(single).eval()
    batch = next(iter(_datamodule().loader("val")))
    images = batch["image"]
    with torch.no_grad():
        # λ = 0.3 everywhere = the MergeCallback's α = 0.3 encoder
        tinted, merged = module(images), module.net(images)
        teachers = module.teacher_outputs(images)
    for task in TASKS:
        torch.testing.assert_close(tinted[task], merged[task], rtol=1e-4, atol=1e-5)
        single_model = SIMOModule(
            tasks=[task], num_classes={"segmentation": 8}, encoder=TINY_VIT, head=HEAD
        ).eval()
        single_model.load_net_weights(single.checkpoints[task])
        with torch.no_grad():
            expected = single_model.net(images)[task]
        torch.testing.assert_close(teachers[task], expected, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(teachers[task], merged[task], atol=1e-3)


def test_fit_without_tinting_set_up_is_refused() -> None:
    with pytest.raises(ValueError, match="merge.realign: tinting"):
        _module().configure_optimizers()


# ----------------------------------------------------------------------------- training
def test_coefficients_stay_in_range_with_a_large_learning_rate(
    fitted: tuple[TintingModule, L.Trainer],
) -> None:
    module, trainer = fitted
    lam = module.layer_merge.coefficients.detach()
    assert lam.min() >= 0.0 and lam.max() <= 1.0
    assert (lam == 0.0).any() or (lam == 1.0).any()  # lr 1.0 drives some to a bound
    assert not torch.allclose(lam, torch.full_like(lam, 0.3))
    # 8 training images, 1 batch per epoch, 2 epochs: one Adam step per task and batch
    assert trainer.global_step == 2 * len(TASKS)
    metrics = trainer.callback_metrics
    for task in TASKS:
        assert math.isfinite(float(metrics[f"train/{task}/tint_loss"]))
    assert 0.0 < float(metrics["train/segmentation/kept_fraction"]) <= 1.0
    assert float(metrics["train/lambda_mean"]) == pytest.approx(lam.mean().item())


def test_only_the_last_visited_task_holds_gradients(
    fitted: tuple[TintingModule, L.Trainer],
) -> None:
    module, trainer = fitted
    # gradients are set to None before each task's step, so idle tasks' tinted layers are not
    # moved by Adam's momentum: after the last step only one task's layer has a gradient
    with_grad = [t for t in TASKS if module.net.heads[t].out.weight.grad is not None]
    last_step = trainer.global_step - len(TASKS)
    assert with_grad == [task_order(list(TASKS), last_step)[-1]]


def test_tinting_moves_the_tinted_layers_and_nothing_else(
    single: SingleTasks,
    fitted: tuple[TintingModule, L.Trainer],
) -> None:
    module, _ = fitted
    for task in TASKS:
        start = load_state_dict(single.checkpoints[task])
        head = module.net.heads[task].state_dict()
        assert not torch.equal(head["out.weight"], start[f"net.heads.{task}.out.weight"])
        for key in ("norm.weight", "norm.bias", "norm.running_mean", "norm.running_var"):
            assert torch.equal(head[key], start[f"net.heads.{task}.{key}"]), key


def test_labels_are_never_used(
    single: SingleTasks,
    fitted: tuple[TintingModule, L.Trainer],
) -> None:
    garbage = _GarbageDataModule(
        **{**DATA, "tasks": list(TASKS), "augment": False, "train_split": "val"}
    )
    garbage.setup("fit")
    clean_sample, garbage_sample = (
        _datamodule().make_dataset("val", False)[0],
        garbage.datasets["train"][0],
    )
    assert torch.equal(clean_sample["image"], garbage_sample["image"])
    assert not torch.equal(clean_sample["depth"], garbage_sample["depth"])
    module, _ = _fit(single, garbage, lr_coefficients=1.0)
    reference = _trained_state(fitted[0])
    trained = _trained_state(module)
    assert reference.keys() == trained.keys()
    for key, value in reference.items():
        assert torch.equal(value, trained[key]), key


def test_teacher_cache_serves_later_epochs(fitted: tuple[TintingModule, L.Trainer]) -> None:
    cache = fitted[0].teacher_cache
    assert len(cache) == DATA["num_val"]
    assert (cache.misses, cache.hits) == (8, 8)  # epoch 1 computes, epoch 2 reads


def test_teacher_cache_refuses_changed_images() -> None:
    calls = []

    def compute(images: Tensor) -> list[Tensor]:
        calls.append(images.shape[0])
        return [images.mean(dim=1, keepdim=True)]

    cache = SampleCache("teacher targets", "`cache_teachers: false`", "cpu")
    images = torch.rand(2, 3, 8, 10)
    first = cache.get(torch.tensor([0, 1]), images, compute)
    again = cache.get(torch.tensor([1, 0]), images.flip(0), compute)
    assert calls == [2]
    torch.testing.assert_close(again[0], first[0].flip(0))
    with pytest.raises(ValueError, match="training sample 1 is not the image"):
        cache.get(torch.tensor([0, 1]), torch.stack([images[0], images[1].flip(-1)]), compute)


def test_uncached_teachers_train_the_same(
    single: SingleTasks,
    fitted: tuple[TintingModule, L.Trainer],
) -> None:
    module, _ = _fit(single, _datamodule(), lr_coefficients=1.0, cache_teachers=False)
    assert module.teacher_cache is None
    reference = _trained_state(fitted[0])
    for key, value in _trained_state(module).items():
        torch.testing.assert_close(value, reference[key], rtol=1e-4, atol=1e-5, msg=key)


def test_checkpoint_holds_the_merged_encoder_and_restores(
    single: SingleTasks,
    fitted: tuple[TintingModule, L.Trainer],
    tmp_path: Path,
) -> None:
    module, trainer = fitted
    path = tmp_path / "tinted.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert "layer_merge.coefficients" in state
    assert not any(k.startswith(("layer_merge.theta0", "layer_merge.tau")) for k in state)
    with torch.no_grad():
        merged = module.layer_merge.merged()
    stored = encoder_state_dict(state)
    for name, value in merged.items():
        torch.testing.assert_close(stored[name], value, msg=name)

    images = next(iter(_datamodule().loader("test")))["image"]
    module.eval()
    with torch.no_grad():
        expected = module(images)
    # a plain SIMOModule loading the checkpoint is the re-aligned model
    plain = SIMOModule(
        tasks=list(TASKS),
        num_classes={"segmentation": 8},
        encoder=TINY_VIT,
        head=HEAD,
        init_from=str(path),
    ).eval()
    # a fresh TintingModule, merged again by the callback, gets λ and tinted layers back
    restored = _set_up(single)
    restored.load_state_dict(state)
    restored.eval()
    with torch.no_grad():
        from_plain, from_restored = plain.net(images), restored(images)
    for task in TASKS:
        torch.testing.assert_close(from_plain[task], expected[task], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(from_restored[task], expected[task], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- command line
def _run_cli(args: list[str]) -> None:
    with (
        mock.patch.dict(os.environ, {"LIGHTNING_SIMO_DEBUG": "1"}),
        mock.patch.object(sys, "argv", ["lightning_simo"]),
    ):
        main(args)


def _delta(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "test_metrics.json").read_text())["metrics"]


E2E_DATA = {
    "num_train": 64,
    "num_val": 32,
    "num_test": 32,
    "height": 32,
    "width": 40,
    "batch_size": 8,
}


@pytest.mark.slow
def test_cli_tinting_improves_the_merged_model(tmp_path: Path) -> None:
    dm = _datamodule(**{**E2E_DATA, "train_split": "train"})
    single = make_single_tasks(tmp_path, dm, steps=80)
    encoder = {**TINY_VIT, "checkpoint": str(single.theta0)}
    checkpoints = ", ".join(f"{t}: {p}" for t, p in single.checkpoints.items())
    config = ROOT / "configs" / "synthetic" / "merge_tinting.yaml"
    common = [
        "--config",
        str(config),
        "--model.init_args.encoder",
        json.dumps(encoder),
        "--model.init_args.reference_metrics",
        json.dumps(single.references),
        "--merge.checkpoints",
        f"{{{checkpoints}}}",
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.log_every_n_steps",
        "1",
        "--log_images",
        "false",
        *[
            arg
            for key, value in E2E_DATA.items()
            for arg in (f"--data.init_args.{key}", str(value))
        ],
    ]
    before = tmp_path / "none"
    _run_cli(
        ["test", *common, "--merge.realign", "none", "--trainer.default_root_dir", str(before)]
    )
    after = tmp_path / "tinting"
    run = [*common, "--trainer.default_root_dir", str(after), "--trainer.max_epochs", "6"]
    _run_cli(["fit", *run])
    last = after / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no label-based pick
    _run_cli(["test", *run, "--ckpt_path", str(last)])
    m_before, m_after = _delta(before), _delta(after)
    print(
        f"\nΔ_MTL ratio before {m_before['delta_mtl_ratio']:.2f} after "
        f"{m_after['delta_mtl_ratio']:.2f}; difference before "
        f"{m_before['delta_mtl_difference']:.2f} after {m_after['delta_mtl_difference']:.2f}"
    )
    for task in TASKS:
        print(task, f"{m_before[f'{task}/normalized']:.4f} -> {m_after[f'{task}/normalized']:.4f}")
    assert m_after["delta_mtl_ratio"] > m_before["delta_mtl_ratio"]
    assert m_after["delta_mtl_difference"] > m_before["delta_mtl_difference"]
