"""``lightning_simo prepare`` on tiny fake official sources, written here, loads in the datamodules.

The fakes have the official formats: NYU's MATLAB v7.3 ``nyu_depth_v2_labeled.mat`` (HDF5,
column-major arrays) with its ``splits.mat`` (1-based indices), and Cityscapes' three folders of
PNGs (8-bit label ids, 16-bit disparity ``256 d + 1``). A source with a file missing is refused
with the file named, and nothing is left in the output's folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
from scipy.io import savemat

from lightning_simo.cli import main
from lightning_simo.data.cityscapes import CityscapesDataModule
from lightning_simo.data.nyuv2 import NYUv2DataModule
from lightning_simo.prepare.nyuv2 import label_table, normals_from_depth

NYU_H, NYU_W = 24, 32
NYU_TRAIN, NYU_TEST = [2, 5], [1, 3, 4, 6]  # 1-based, as in splits.mat
RAW_WALL, RAW_FLOOR = 21, 11  # raw NYU ids whose NYU-40 classes are wall (1) and floor (2)
WALL_13, FLOOR_13 = 11, 4  # 0-based NYU-13 ids of wall and floor


@pytest.fixture(autouse=True)
def _argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning_simo"])


def _fake_nyu(root: Path, drop: str | None = None) -> Path:
    rng = np.random.default_rng(0)
    n = len(NYU_TRAIN) + len(NYU_TEST)
    images = rng.integers(0, 256, (n, NYU_H, NYU_W, 3), dtype=np.uint8)
    depths = np.full((n, NYU_H, NYU_W), 2.5, dtype=np.float32)  # a plane facing the camera
    depths[:, :, :4] = 0.0  # invalid columns
    labels = np.full((n, NYU_H, NYU_W), RAW_WALL, dtype=np.uint16)
    labels[:, NYU_H // 2 :] = RAW_FLOOR
    labels[:, 0, 0] = 0  # unlabelled
    path = root / "nyu_depth_v2_labeled.mat"
    with h5py.File(path, "w") as f:  # MATLAB v7.3 is column-major: h5py sees the transpose
        arrays = {
            "images": images.transpose(0, 3, 2, 1),
            "depths": depths.transpose(0, 2, 1),
            "labels": labels.transpose(0, 2, 1),
        }
        for key, array in arrays.items():
            if key != drop:
                f.create_dataset(key, data=array)
    savemat(
        root / "splits.mat",
        {"trainNdxs": np.array(NYU_TRAIN)[:, None], "testNdxs": np.array(NYU_TEST)[:, None]},
    )
    return path


def test_label_table_maps_894_ids_to_13_classes() -> None:
    table = label_table()
    assert table.shape == (895,) and table[0] == -1
    assert table[RAW_WALL] == WALL_13 and table[RAW_FLOOR] == FLOOR_13
    assert set(np.unique(table[1:])) == set(range(13))


def test_normals_of_a_fronto_parallel_plane_face_the_camera() -> None:
    normals = normals_from_depth(np.full((10, 12), 3.0), 500.0, 500.0, 6.0, 5.0)
    assert np.allclose(normals[2:-2, 2:-2], [0.0, 0.0, -1.0], atol=1e-6)


def test_prepare_nyuv2_writes_what_the_datamodule_loads(tmp_path: Path) -> None:
    source = _fake_nyu(tmp_path)
    out = tmp_path / "data" / "nyuv2"
    main(["prepare", "nyuv2", "--source", str(source), "--out", str(out), "--size", "12", "16"])
    assert len(list((out / "train" / "image").glob("*.npy"))) == len(NYU_TRAIN)
    assert len(list((out / "val" / "normal").glob("*.npy"))) == len(NYU_TEST)

    dm = NYUv2DataModule(root=str(out), num_val=2, batch_size=2, crop=None)
    dm.setup("fit")
    dm.setup("test")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 12, 16)
    assert batch["depth"].shape == (2, 1, 12, 16) and batch["normals"].shape == (2, 3, 12, 16)
    test = dm.datasets["test"][0]
    labels = test["segmentation"]
    assert labels[0, 0] == -1 and labels[1, 5] == WALL_13 and labels[-1, 5] == FLOOR_13
    depth, normals = test["depth"][0], test["normals"]
    assert torch.all(depth[:, :2] == 0) and torch.allclose(depth[:, 4:], torch.tensor(2.5))
    interior = normals[:, 3:-3, 4:-3]
    assert torch.allclose(interior, torch.tensor([0.0, 0.0, -1.0])[:, None, None], atol=1e-5)
    assert torch.all(normals[:, :, 0] == 0)  # invalid depth -> invalid normal


def test_nyuv2_uses_a_normals_folder_when_given(tmp_path: Path) -> None:
    source = _fake_nyu(tmp_path)
    folder = tmp_path / "normals"
    folder.mkdir()
    up = np.zeros((NYU_H, NYU_W, 3), np.float32)
    up[..., 1] = -1.0
    for k in range(len(NYU_TRAIN) + len(NYU_TEST)):
        np.save(folder / f"{k}.npy", up)
    out = tmp_path / "nyu"
    main(["prepare", "nyuv2", "--source", str(source), "--normals", str(folder), "--out", str(out)])
    normal = np.load(out / "train" / "normal" / "0.npy")
    assert normal.shape == (288, 384, 3) and np.allclose(normal, [0.0, -1.0, 0.0])
    np.save(folder / "3.npy", up)
    (folder / "4.npy").unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "nyuv2", "--source", str(source), "--normals", str(folder), "--out",
              str(tmp_path / "again")])  # fmt: skip
    assert exit_info.value.code == 2
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize(("drop", "named"), [("labels", "labels"), ("splits", "splits.mat")])
def test_partial_nyuv2_source_is_refused_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], drop: str, named: str
) -> None:
    source = _fake_nyu(tmp_path, drop=drop if drop != "splits" else None)
    if drop == "splits":
        (tmp_path / "splits.mat").unlink()
    out = tmp_path / "out" / "nyuv2"
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "nyuv2", "--source", str(source), "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning_simo: error: NYUv2 source incomplete") and named in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- Cityscapes
CITY_H, CITY_W = 32, 64
CITY_FILES = {"train": ["aachen_000000_000019", "aachen_000001_000019", "bremen_000000_000019"],
              "val": ["lindau_000000_000019"]}  # fmt: skip


def _fake_cityscapes(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, stems in CITY_FILES.items():
        for stem in stems:
            city = stem.split("_")[0]
            paths = {
                f: root / f / split / city / f"{stem}{suffix}"
                for f, suffix in (
                    ("leftImg8bit", "_leftImg8bit.png"),
                    ("gtFine", "_gtFine_labelIds.png"),
                    ("disparity", "_disparity.png"),
                )
            }
            for path in paths.values():
                path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(
                str(paths["leftImg8bit"]), rng.integers(0, 256, (CITY_H, CITY_W, 3), np.uint8)
            )
            ids = np.full((CITY_H, CITY_W), 7, np.uint8)  # road
            ids[:, CITY_W // 2 :] = 24  # person
            ids[0] = 0  # unlabelled
            cv2.imwrite(str(paths["gtFine"]), ids)
            disparity = np.full((CITY_H, CITY_W), 256 * 40 + 1, np.uint16)  # 40 px
            disparity[:, :8] = 0  # invalid
            cv2.imwrite(str(paths["disparity"]), disparity)
    return root


def test_prepare_cityscapes_writes_what_the_datamodule_loads(tmp_path: Path) -> None:
    source = _fake_cityscapes(tmp_path / "downloads")
    out = tmp_path / "data" / "cityscapes"
    main(["prepare", "cityscapes", "--source", str(source), "--out", str(out), "--size", "8", "16"])
    for classes, person in ((19, 11), (7, 5)):
        dm = CityscapesDataModule(
            root=str(out), tasks=["segmentation", "disparity"], classes=classes, num_val=1,
            batch_size=2, crop=None,
        )  # fmt: skip
        dm.setup("fit")
        dm.setup("test")
        assert [len(dm.datasets[s]) for s in ("train", "val", "test")] == [2, 1, 1]
        sample = dm.datasets["test"][0]
        assert sample["image"].shape == (3, 8, 16)
        labels = sample["segmentation"]
        assert labels[0, 0] == -1 and labels[4, 2] == 0 and labels[4, 12] == person
        disparity = sample["disparity"][0]
        assert torch.all(disparity[:, :2] == 0)
        assert torch.allclose(disparity[:, 4:], torch.tensor(40.0 * 16 / CITY_W))


def test_partial_cityscapes_source_names_the_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _fake_cityscapes(tmp_path / "downloads")
    gone = source / "disparity" / "train" / "bremen" / "bremen_000000_000019_disparity.png"
    gone.unlink()
    out = tmp_path / "data" / "cityscapes"
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "cityscapes", "--source", str(source), "--out", str(out)])
    assert exit_info.value.code == 2
    assert str(gone) in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_unknown_format_and_existing_output_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _fake_cityscapes(tmp_path / "downloads")
    with pytest.raises(SystemExit):
        main(["prepare", "cityscapes", "--source", str(source), "--out", str(tmp_path / "o"),
              "--format", "parquet"])  # fmt: skip
    assert "npy" in capsys.readouterr().err
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "mine.txt").write_text("keep")
    with pytest.raises(SystemExit):
        main(["prepare", "cityscapes", "--source", str(source), "--out", str(tmp_path / "o")])
    assert (tmp_path / "o" / "mine.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["downloads", "o"]
