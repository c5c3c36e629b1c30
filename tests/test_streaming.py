"""Streaming datamodule over a litdata optimized dataset, with a local folder as the bucket.

The dataset is written once (``litdata.optimize`` from the synthetic datamodule); the tests check
that the streamed batches equal the file datamodule's, that the training order comes from the
seed and covers every sample once per epoch, that resuming a loader mid-epoch continues that
epoch, and that a model trains on it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lightning_simo.data.streaming import INFO_NAME, StreamingDenseDataModule, write_litdata
from lightning_simo.data.synthetic import SyntheticDataModule
from lightning_simo.modules.simo import SIMOModule

TASKS = ["segmentation", "depth", "normals"]
SIZES = {"num_train": 16, "num_val": 8, "num_test": 8, "height": 32, "width": 40}


def _files(tasks: list[str] = TASKS, **kwargs: Any) -> SyntheticDataModule:
    return SyntheticDataModule(tasks=tasks, augment=False, batch_size=4, **SIZES, **kwargs)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bucket") / "synthetic"
    counts = write_litdata(_files(), root, start_method="fork")
    assert counts == {"train": 16, "val": 8, "test": 8}
    return root


def _streaming(bucket: Path, **kwargs: Any) -> StreamingDenseDataModule:
    options = {"tasks": ["segmentation", "depth"], "batch_size": 4, **kwargs}
    return StreamingDenseDataModule(root=str(bucket), **options)


def _assert_same_batches(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.keys() == b.keys()
        for key in b:
            assert a[key].dtype == b[key].dtype, key
            assert torch.equal(a[key], b[key]), key


def test_written_dataset_records_tasks_and_sizes(bucket: Path) -> None:
    info = json.loads((bucket / "train" / INFO_NAME).read_text())
    assert info["tasks"] == {"segmentation": 8, "depth": None, "normals": None}
    assert info["samples"] == 16
    dm = _streaming(bucket)
    assert dm.num_classes == {"segmentation": 8}


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_streamed_batches_equal_the_file_datamodule(bucket: Path, split: str) -> None:
    files = _files(["segmentation", "depth"])
    expected = list(files.loader(split))
    got = list(_streaming(bucket, shuffle=False).loader(split))
    _assert_same_batches(got, expected)


def test_training_order_comes_from_the_seed_and_covers_the_split(bucket: Path) -> None:
    def order(seed: int) -> list[int]:
        dm = _streaming(bucket, seed=seed)
        dm.setup("fit")
        return torch.cat([b["index"] for b in dm.train_dataloader()]).tolist()

    first = order(0)
    assert sorted(first) == list(range(16))
    assert order(0) == first
    assert order(1) != first


def test_augmentation_is_the_file_datamodules_pipeline(bucket: Path) -> None:
    dm = _streaming(bucket, augment=True, height=24, width=32, shuffle=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 24, 32)
    assert batch["depth"].shape == (4, 1, 24, 32)
    assert batch["segmentation"].shape == (4, 24, 32)
    with pytest.raises(ValueError, match="height and width"):
        _streaming(bucket, augment=True)


def test_resuming_mid_epoch_continues_the_epoch(bucket: Path) -> None:
    dm = _streaming(bucket, seed=3)
    dm.setup("fit")
    uninterrupted = [b["index"].tolist() for b in dm.train_dataloader()]
    loader = dm.train_dataloader()
    seen = []
    for i, batch in enumerate(loader):
        seen.append(batch["index"].tolist())
        if i == 1:
            state = loader.state_dict()
            break
    resumed_dm = _streaming(bucket, seed=3)
    resumed_dm.setup("fit")
    resumed = resumed_dm.train_dataloader()
    resumed.load_state_dict(state)
    rest = [b["index"].tolist() for b in resumed]
    assert seen + rest == uninterrupted
    assert len(rest) == 2  # the two batches left of four, not a new epoch


def test_a_model_trains_a_few_steps_on_the_stream(bucket: Path, tmp_path: Path) -> None:
    from conftest import TINY_VIT

    dm = _streaming(bucket)
    module = SIMOModule(
        tasks=dm.tasks,
        num_classes=dm.num_classes,
        encoder=dict(TINY_VIT),
        head={"kind": "linear", "upsample": 4},
        schedule="constant",
        lr=1e-3,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    before = {k: v.clone() for k, v in module.net.heads.state_dict().items()}
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3
    after = module.net.heads.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_missing_dataset_and_budget_are_refused(bucket: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="prepare --format litdata"):
        StreamingDenseDataModule(root=str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="train_budget"):
        _streaming(bucket, train_budget=4)
    with pytest.raises(ValueError, match="already exists"):
        write_litdata(_files(), bucket, splits=["val"])


def test_prepare_command_writes_the_config_datamodule(tmp_path: Path) -> None:
    from lightning_simo.prepare.litdata import main

    config = tmp_path / "data.yaml"
    data = {"class_path": "lightning_simo.data.synthetic.SyntheticDataModule"}
    data["init_args"] = {"tasks": ["depth"], **SIZES, "num_train": 4}
    config.write_text(json.dumps({"trainer": {"max_epochs": 1}, "data": data}))
    out = tmp_path / "out"
    main(
        ["--format", "litdata", "--config", str(config), "--out", str(out)]
        + ["--splits", "[val]", "--start_method", "fork"]
    )
    assert json.loads((out / "val" / INFO_NAME).read_text())["tasks"] == {"depth": None}
    dm = StreamingDenseDataModule(root=str(out), train_split="val", batch_size=4)
    _assert_same_batches(list(dm.loader("val")), list(_files(["depth"]).loader("val")))
    with pytest.raises(ValueError, match="no `data:` section"):
        (tmp_path / "empty.yaml").write_text("trainer: {}\n")
        main(["--format", "litdata", "--config", str(tmp_path / "empty.yaml"), "--out", "x"])
