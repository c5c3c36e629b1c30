"""What the study reports: intervals over seeds, the claims check, the stopping rule, the α cache."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import EarlyStopping

from lightning_simo.interruption import stopping_rule
from lightning_simo.merging.search import SearchCache, search_key, search_scaling
from lightning_simo.study_report import (
    claims_markdown,
    evaluate_claims,
    format_cell,
    interval,
    summarise,
    write_tables,
)

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- intervals
def test_interval_of_three_known_numbers_equals_the_hand_computation():
    stats = interval([1.0, 2.0, 3.0])
    # mean 2, sample std 1, t_{0.975, 2} = 4.302652729911275 (two-sided 95%, 2 dof)
    half = 4.302652729911275 * 1.0 / math.sqrt(3)
    assert stats.mean == pytest.approx(2.0)
    assert stats.std == pytest.approx(1.0)
    assert stats.low == pytest.approx(2.0 - half, abs=1e-9)
    assert stats.high == pytest.approx(2.0 + half, abs=1e-9)
    assert interval([5.0]).low is None  # one seed: no interval


def test_summary_keeps_std_and_bounds_per_column_and_cells_show_them():
    seeds = [[{"method": "m", "group": "merge", "x": v, "steps": 10}] for v in (1.0, 2.0, 3.0)]
    (row,) = summarise(seeds)
    assert row["seeds"] == 3 and row["x"] == pytest.approx(2.0)
    assert row["x_std"] == pytest.approx(1.0) and row["x_low"] < 2.0 < row["x_high"]
    assert row["steps_std"] == 0.0
    assert format_cell(row, "x") == "2 ± 1 [-0.4841, 4.484]"
    assert format_cell(row, "steps") == "10"  # every seed agrees: the value alone


# ----------------------------------------------------------------------------- claims
def _row(method, group, delta, low=None, high=None, **costs):
    row = {"method": method, "group": group, "delta_mtl_ratio": delta, **costs}
    if low is not None:
        row.update(delta_mtl_ratio_std=1.0, delta_mtl_ratio_low=low, delta_mtl_ratio_high=high)
    return row


def test_claims_hold_on_a_table_that_satisfies_them():
    rows = [
        _row("task_arithmetic", "merge", -30.0, -32.0, -28.0),
        _row(
            "ta + heads",
            "realign-heads",
            -4.0,
            -5.0,
            -3.0,
            labelled_samples=250,
            optimizer_steps=80,
        ),
        _row(
            "joint MTL (equal)", "mtl", -3.0, -4.5, -1.5, labelled_samples=1500, optimizer_steps=900
        ),
    ]
    assert [c.holds for c in evaluate_claims(rows)] == [True, True, True, True]


def test_claims_section_says_does_not_hold_for_a_table_built_to_violate_them():
    rows = [
        # (a) one merge method's interval reaches above -10%
        _row("average", "merge", -30.0, -32.0, -28.0),
        _row("ties", "merge", -12.0, -15.0, -9.0),
        # (b) the best re-alignment stays below joint MTL's interval; (c) it costs more steps
        _row(
            "ta + heads",
            "realign-heads",
            -20.0,
            -22.0,
            -18.0,
            labelled_samples=250,
            optimizer_steps=2000,
        ),
        # (d) joint MTL's interval leaves the ±5% band
        _row("joint MTL (equal)", "mtl", 6.0, 4.0, 8.0, labelled_samples=1500, optimizer_steps=900),
    ]
    claims = evaluate_claims(rows)
    assert [c.holds for c in claims] == [False, False, False, False]
    text = claims_markdown(claims)
    assert text.startswith("## Claims")
    assert text.count("**does not hold**") == 4 and "**holds**" not in text
    assert "optimizer steps ×2.22" in text


def test_results_md_ends_with_the_claims(tmp_path):
    rows = summarise([[_row("joint MTL (equal)", "mtl", d)] for d in (1.0, 2.0, 3.0)])
    write_tables(rows, ["method", "delta_mtl_ratio"], tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "± 1 [" in md and md.rstrip().splitlines()[-1].startswith("- (d)")
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:6] == [
        "method",
        "seeds",
        "delta_mtl_ratio",
        "delta_mtl_ratio_std",
        "delta_mtl_ratio_low",
        "delta_mtl_ratio_high",
    ]


# ----------------------------------------------------------------------------- stopping rule
class _FlatValLoss(L.LightningModule):
    """Trains a weight; its val loss is a constant, so it never improves after epoch 1."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w - 1.0).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", torch.tensor(1.0))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(4, 1), batch_size=2)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(2, 1), batch_size=2)


def _config_stopping_rule(name: str) -> tuple[type[EarlyStopping], dict]:
    """The stopping callback of a synthetic config: its class (an ``EarlyStopping``) and options."""
    config = yaml.safe_load((REPO / "configs" / "synthetic" / f"{name}.yaml").read_text())
    for callback in config["trainer"]["callbacks"]:
        module, _, cls_name = callback["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), cls_name)
        if issubclass(cls, EarlyStopping):
            return cls, callback["init_args"]
    raise AssertionError(f"{name}.yaml has no EarlyStopping")


@pytest.mark.parametrize("config", ["foundation", "single_task", "mtl"])
def test_early_stopping_of_the_configs_stops_a_run_whose_val_loss_is_flat(tmp_path, config):
    cls, rule = _config_stopping_rule(config)
    assert rule["monitor"] == "val/loss"
    trainer = L.Trainer(
        max_epochs=50,
        callbacks=[cls(**rule)],
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(_FlatValLoss())
    assert trainer.current_epoch == 1 + rule["patience"]  # the first epoch sets the minimum
    assert stopping_rule(trainer) == "early_stopping"


# ----------------------------------------------------------------------------- α cache
def test_alpha_cache_returns_the_same_alpha_without_evaluating(tmp_path):
    path = tmp_path / "alpha_search.json"
    key = search_key(sources=["a", "b"], method="task_arithmetic", method_options={})
    first = search_scaling(
        lambda a: -((a - 0.4) ** 2), [0.0, 0.2, 0.4, 0.6], cache=SearchCache(path), key=key
    )

    def never(alpha: float) -> float:
        raise AssertionError(f"α = {alpha} evaluated again")

    again = search_scaling(never, [0.0, 0.2, 0.4, 0.6], cache=SearchCache(path), key=key)
    assert again.best == first.best == 0.4
    assert again.cached == (0.0, 0.2, 0.4, 0.6)


def test_the_search_key_ignores_the_labelled_budget_of_the_trained_split():
    from lightning_simo.callbacks.merge import _describe
    from lightning_simo.data.synthetic import SyntheticDataModule

    full = SyntheticDataModule(tasks=["depth"], train_split="val")
    part = SyntheticDataModule(tasks=["depth"], train_split="val", train_budget=0.1)
    assert _describe(full) == _describe(part)
    assert _describe(full, searched_split_is_trained=True) != _describe(
        part, searched_split_is_trained=True
    )


# ----------------------------------------------------------------------------- encoder passes
def test_encoder_pass_counter_counts_training_and_validation_not_the_test(tmp_path):
    from conftest import cpu_trainer, tiny_datamodule, tiny_module

    from lightning_simo.callbacks.costs import EncoderPassCounter, read_encoder_passes

    dm = tiny_datamodule(["depth"])  # 16 train, 8 val, 8 test scenes
    module = tiny_module(["depth"], probe_epochs=1)
    trainer = cpu_trainer(tmp_path, max_epochs=2, callbacks=[EncoderPassCounter()])
    trainer.fit(module, datamodule=dm)
    fit = read_encoder_passes(tmp_path, by_function=True)["fit"]
    # 2 epochs x (16 train + 8 val) forwards; backward only in epoch 2 (epoch 1: linear probe)
    assert fit == {"forward": 48, "backward": 16}
    trainer.save_checkpoint(tmp_path / "last.ckpt")  # carries the counter's state
    test = cpu_trainer(tmp_path, callbacks=[EncoderPassCounter()])
    test.test(module, datamodule=dm, ckpt_path=tmp_path / "last.ckpt")
    assert read_encoder_passes(tmp_path, by_function=True)["test"] == {"forward": 0, "backward": 0}
    assert read_encoder_passes(tmp_path) == {"forward": 48, "backward": 16}


def test_evaluation_features_are_cached_per_loop_for_a_frozen_encoder():
    from conftest import tiny_encoder

    from lightning_simo.callbacks.realign import EvalFeatureCaches
    from lightning_simo.models.encoders import Encoder, EncoderConfig

    encoder = Encoder(EncoderConfig.coerce(tiny_encoder())).eval()
    caches = EvalFeatureCaches(encoder)
    val, test = torch.rand(4, 3, 32, 40), torch.rand(4, 3, 32, 40)
    index = torch.arange(4)
    for _ in range(2):  # two validation epochs: the encoder runs once
        got = caches({"image": val, "index": index}, "validate")
    served = caches({"image": test, "index": index}, "test")  # same indices, other images
    assert caches.caches["validate"].misses == 4 and caches.caches["validate"].hits == 4
    with torch.no_grad():
        for out, images in ((got, val), (served, test)):
            for a, b in zip(out.features, encoder(images).features, strict=True):
                assert torch.allclose(a, b, atol=1e-6)
