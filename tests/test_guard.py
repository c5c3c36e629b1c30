"""NonFiniteGuard: a NaN task loss at step k stops training (nothing saved after it) or is skipped."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import cpu_trainer, tiny_datamodule, tiny_module
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor

from lightning_simo.callbacks.guard import NonFiniteGuard, NonFiniteLossError, first_nonfinite
from lightning_simo.data.synthetic import SyntheticDataModule
from lightning_simo.modules.joint import JointMTLModule
from lightning_simo.modules.simo import SIMOModule

TASKS = ["segmentation", "depth"]
BAD_TASK = "depth"


class NaNAt:
    """Mixin: the ``BAD_TASK`` loss becomes NaN in training batch number ``bad_step`` (from 0)."""

    bad_step = -1
    train_calls = 0

    def task_losses(self, batch: Mapping[str, Tensor]) -> tuple[dict, dict]:
        preds, losses = super().task_losses(batch)  # type: ignore[misc]
        if self.training:  # type: ignore[attr-defined]
            if self.train_calls == self.bad_step:
                losses[BAD_TASK] = losses[BAD_TASK] * float("nan")
            self.train_calls += 1
        return preds, losses


class NaNSIMOModule(NaNAt, SIMOModule):
    pass


class NaNJointModule(NaNAt, JointMTLModule):
    pass


def make_module(cls: type, bad_step: int, **kwargs: object) -> L.LightningModule:
    torch.manual_seed(0)
    module = tiny_module(TASKS, cls, lr=1e-3, schedule="constant", **kwargs)
    module.bad_step = bad_step
    return module


def make_data() -> SyntheticDataModule:
    return tiny_datamodule(TASKS, num_val=4, num_test=4, batch_size=4, augment=False)


def make_trainer(tmp_path: Path, *callbacks: L.Callback, max_epochs: int = 1) -> L.Trainer:
    return cpu_trainer(
        tmp_path,
        max_epochs=max_epochs,
        enable_checkpointing=True,
        limit_val_batches=0,
        callbacks=list(callbacks),
    )


def step_checkpoint(tmp_path: Path) -> ModelCheckpoint:
    """Saves after every step, keeping the best ``train/loss_step`` as ``best.ckpt``."""
    return ModelCheckpoint(
        dirpath=tmp_path / "checkpoints",
        filename="best",
        monitor="train/loss_step",
        mode="min",
        every_n_train_steps=1,
        save_top_k=1,
        save_last=True,
    )


def all_finite(state: Mapping[str, Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def test_first_nonfinite_names_the_task_and_value() -> None:
    finite = {"a": torch.tensor(1.0), "b": torch.tensor(2.0)}
    assert first_nonfinite(finite) is None
    assert first_nonfinite({}) is None
    assert first_nonfinite({"a": torch.tensor(1.0), "b": torch.tensor(float("inf"))}) == (
        "b",
        float("inf"),
    )
    task, value = first_nonfinite({"a": torch.tensor(float("nan")), "b": torch.tensor(1.0)})
    assert task == "a" and value != value  # NaN


def test_unknown_action_is_refused() -> None:
    with pytest.raises(ValueError, match="one of \\('stop', 'skip'\\)"):
        NonFiniteGuard("ignore")


def test_stop_raises_with_task_step_and_value_and_saves_nothing_after(tmp_path: Path) -> None:
    module = make_module(NaNSIMOModule, bad_step=2)
    checkpoint = step_checkpoint(tmp_path)
    trainer = make_trainer(tmp_path, NonFiniteGuard("stop"), checkpoint)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(module, make_data())
    message = str(info.value)
    assert "'depth'" in message and "global step 2" in message and "nan" in message

    # steps 0 and 1 trained and were saved; the NaN step updated nothing and saved nothing
    assert trainer.global_step == 2
    assert checkpoint.best_model_score is not None
    assert torch.isfinite(checkpoint.best_model_score)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    best = torch.load(checkpoint.best_model_path, weights_only=True)
    assert last["global_step"] == 2 and best["global_step"] <= 2
    assert all_finite(last["state_dict"]) and all_finite(best["state_dict"])
    # the forward pass of the bad batch moved BatchNorm statistics, but no weight changed
    for key, value in module.named_parameters():
        assert torch.equal(value, last["state_dict"][key]), key


def test_stop_at_the_first_step_leaves_no_checkpoint(tmp_path: Path) -> None:
    module = make_module(NaNSIMOModule, bad_step=0)
    trainer = make_trainer(tmp_path, NonFiniteGuard("stop"), step_checkpoint(tmp_path))
    with pytest.raises(NonFiniteLossError, match="global step 0"):
        trainer.fit(module, make_data())
    assert not list(tmp_path.rglob("*.ckpt"))


class Snapshots(L.Callback):
    """Weights before and after every training batch."""

    def __init__(self) -> None:
        self.before: dict[int, dict[str, Tensor]] = {}
        self.after: dict[int, dict[str, Tensor]] = {}

    @staticmethod
    def _copy(module: L.LightningModule) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.before[batch_idx] = self._copy(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.after[batch_idx] = self._copy(pl_module)


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [(NaNSIMOModule, {}), (NaNJointModule, {"weighting": "gradnorm"})],
    ids=["simo", "joint-gradnorm"],
)
def test_skip_leaves_weights_untouched_and_training_goes_on(
    cls: type, kwargs: dict, tmp_path: Path
) -> None:
    module = make_module(cls, bad_step=2, **kwargs)
    guard = NonFiniteGuard("skip")
    snapshots = Snapshots()
    trainer = make_trainer(tmp_path, guard, snapshots)
    with pytest.warns(UserWarning, match="'depth' has a non-finite training loss"):
        trainer.fit(module, make_data())

    assert guard.skipped == 1
    assert guard.state_dict() == {"skipped": 1}
    assert all_finite(module.state_dict())
    params = [k for k, _ in module.named_parameters()]
    skipped_before, skipped_after = snapshots.before[2], snapshots.after[2]
    assert all(torch.equal(skipped_before[k], skipped_after[k]) for k in params)
    trained_before, trained_after = snapshots.before[3], snapshots.after[3]
    assert any(not torch.equal(trained_before[k], trained_after[k]) for k in params)
    assert module.nonfinite_guard is None  # released at teardown


def test_guard_refuses_a_module_that_cannot_screen_losses(tmp_path: Path) -> None:
    from lightning.pytorch.demos.boring_classes import BoringModel

    trainer = make_trainer(tmp_path, NonFiniteGuard("skip"))
    with pytest.raises(ValueError, match="needs a module that screens its task losses"):
        trainer.fit(BoringModel())
