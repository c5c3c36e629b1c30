"""NYUv2, Cityscapes and Taskonomy loaders on the fake datasets of ``tests/data/<name>/data.py``."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser

from lightning_simo.data.cityscapes import CityscapesDataModule, CityscapesDataset
from lightning_simo.data.nyuv2 import NYUv2DataModule, NYUv2Dataset
from lightning_simo.data.taskonomy import (
    DEFAULT_TASKS,
    TaskonomyDataModule,
    TaskonomyDataset,
)
from lightning_simo.data.transforms import dense_keys

DATA = Path(__file__).resolve().parent / "data"
NYU = DATA / "nyuv2"
CITY = DATA / "cityscapes"
TASKONOMY = DATA / "taskonomy"
ALL_TASKONOMY = [*DEFAULT_TASKS, "segmentation"]
BUILDINGS = {
    "train_buildings": ["allensville", "coffeen"],
    "val_buildings": ["beechwood"],
    "test_buildings": ["ihlen"],
}


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.py"))
    return dst


def _stems(dataset: torch.utils.data.Dataset) -> list[str]:
    return [files["image"].stem for files in dataset.files]


def _batch(loader: torch.utils.data.DataLoader) -> dict[str, torch.Tensor]:
    return next(iter(loader))


# ----------------------------------------------------------------------------- NYUv2
def test_nyuv2_splits_follow_the_seeded_permutation() -> None:
    dm = NYUv2DataModule(str(NYU), num_val=3)
    dm.setup()
    train, val, test = (dm.datasets[s] for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (4, 3, 3)
    assert _stems(train) == ["0", "1", "2", "3"]
    order = torch.randperm(6, generator=torch.Generator().manual_seed(42)).tolist()
    assert _stems(val) == [str(i) for i in sorted(order[:3])]
    assert _stems(test) == [str(i) for i in sorted(order[3:])]
    assert set(_stems(val)).isdisjoint(_stems(test))
    assert all(f["image"].parent.parent.name == "val" for f in test.files)
    again = NYUv2Dataset(NYU, "val", num_val=3, split_seed=42)
    assert _stems(again) == _stems(val)
    other = NYUv2Dataset(NYU, "val", num_val=3, split_seed=1)
    order = torch.randperm(6, generator=torch.Generator().manual_seed(1)).tolist()
    assert _stems(other) == [str(i) for i in sorted(order[:3])]
    assert len(NYUv2Dataset(NYU, "test", num_val=0.5)) == 3


def test_nyuv2_sample_matches_the_files() -> None:
    dataset = NYUv2Dataset(NYU, "test", num_val=3)
    sample = dataset[1]
    stem = dataset.files[1]["image"].stem
    raw = {
        f: np.load(NYU / "val" / f / f"{stem}.npy") for f in ("image", "label", "depth", "normal")
    }
    assert set(sample) == {"image", "segmentation", "depth", "normals", "index"}
    assert sample["index"].dtype == torch.int64 and sample["index"].item() == 1
    assert sample["image"].shape == (3, 24, 32) and sample["image"].dtype == torch.float32
    assert torch.equal(sample["image"], torch.from_numpy(raw["image"]).permute(2, 0, 1))
    assert sample["segmentation"].dtype == torch.int64
    assert torch.equal(sample["segmentation"], torch.from_numpy(raw["label"]))
    assert sample["segmentation"].min() == -1 and sample["segmentation"].max() == 12
    assert sample["depth"].shape == (1, 24, 32)
    assert torch.equal(sample["depth"][0], torch.from_numpy(raw["depth"]))
    assert (sample["depth"][0, :2] == 0).all() and (sample["depth"][0, 2:] > 0).all()
    assert torch.equal(sample["normals"], torch.from_numpy(raw["normal"]).permute(2, 0, 1))
    assert (sample["normals"][:, :, :3] == 0).all()


def test_nyuv2_float_labels_and_hwc1_depth_of_train() -> None:
    sample = NYUv2Dataset(NYU, "train")[0]
    label = np.load(NYU / "train" / "label" / "0.npy")
    depth = np.load(NYU / "train" / "depth" / "0.npy")
    assert label.dtype == np.float32 and depth.shape == (24, 32, 1)
    assert torch.equal(sample["segmentation"], torch.from_numpy(label.astype(np.int64)))
    assert torch.equal(sample["depth"], torch.from_numpy(depth).permute(2, 0, 1))


def test_nyuv2_train_and_eval_batches() -> None:
    dm = NYUv2DataModule(str(NYU), crop=(16, 24), num_val=3, batch_size=4, eval_batch_size=3)
    dm.setup("fit")
    batch = _batch(dm.train_dataloader())
    assert batch["image"].shape == (4, 3, 16, 24)
    assert batch["segmentation"].shape == (4, 16, 24)
    assert batch["segmentation"].dtype == torch.int64
    assert batch["segmentation"].min() >= -1 and batch["segmentation"].max() <= 12
    assert batch["depth"].shape == (4, 1, 16, 24)
    assert sorted(batch["index"].tolist()) == [0, 1, 2, 3]
    norms = batch["normals"].norm(dim=1)
    assert torch.all((norms == 0) | ((norms - 1).abs() < 1e-4))
    batch = _batch(dm.val_dataloader())
    assert batch["image"].shape == (3, 3, 24, 32)
    assert batch["index"].tolist() == [0, 1, 2]
    assert dm.num_classes == {"segmentation": 13}


def test_nyuv2_task_subset_reads_only_its_folders(tmp_path: Path) -> None:
    root = _copy(NYU, tmp_path)
    shutil.rmtree(root / "train" / "normal")
    dm = NYUv2DataModule(str(root), tasks=["depth"], crop=None, num_val=3)
    dm.setup("fit")
    batch = _batch(dm.train_dataloader())
    assert set(batch) == {"image", "depth", "index"}
    assert dm.num_classes == {}


def test_nyuv2_signature_is_readable_by_the_cli() -> None:
    parser = ArgumentParser()
    parser.add_class_arguments(NYUv2DataModule, "data")
    parser.add_class_arguments(CityscapesDataModule, "city")
    parser.add_class_arguments(TaskonomyDataModule, "tk")
    cfg = parser.parse_args(
        ["--data.crop", "[16, 24]", "--data.num_val", "3", "--city.classes", "7"]
    )
    assert tuple(cfg.data.crop) == (16, 24) and cfg.data.num_val == 3 and cfg.data.split_seed == 42
    assert list(cfg.data.scales) == [1.0, 1.2, 1.5]
    assert cfg.city.classes == 7
    assert list(cfg.tk.val_buildings) == ["beechwood", "corozal", "klickitat", "shelbyville"]


def test_synthetic_scenes_load_through_the_nyuv2_datamodule(tmp_path: Path) -> None:
    synthetic = pytest.importorskip("lightning_simo.data.synthetic")
    if not hasattr(synthetic, "write_nyuv2_layout"):
        pytest.skip("lightning_simo.data.synthetic.write_nyuv2_layout is not available")
    root = synthetic.write_nyuv2_layout(
        tmp_path / "nyu", splits={"train": 3, "val": 4}, height=24, width=32, seed=0
    )
    dm = NYUv2DataModule(str(root), crop=(16, 16), num_val=2, batch_size=3)
    dm.setup()
    assert [len(dm.datasets[s]) for s in ("train", "val", "test")] == [3, 2, 2]
    batch = _batch(dm.train_dataloader())
    assert batch["image"].shape == (3, 3, 16, 16)
    assert batch["segmentation"].min() >= -1 and batch["segmentation"].max() < 13
    test = _batch(dm.test_dataloader())
    assert test["depth"].shape == (2, 1, 24, 32)
    assert (test["depth"] >= 0).all() and (test["depth"] > 0).any()


# ----------------------------------------------------------------------------- NYUv2 errors
def test_empty_root_names_the_missing_folder_and_shows_the_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        NYUv2Dataset(tmp_path, "train")
    msg = str(err.value)
    assert str(tmp_path / "train" / "image") in msg
    assert "Expected layout" in msg and "label/0.npy" in msg and "docs/datasets.md" in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        NYUv2Dataset(tmp_path / "absent", "train")


def test_missing_task_folder(tmp_path: Path) -> None:
    root = _copy(NYU, tmp_path)
    shutil.rmtree(root / "val" / "depth")
    with pytest.raises(FileNotFoundError) as err:
        NYUv2Dataset(root, "val", num_val=3)
    assert str(root / "val" / "depth") in str(err.value)
    assert "normal/0.npy" in str(err.value)


def test_file_count_mismatch_names_folder_and_counts(tmp_path: Path) -> None:
    root = _copy(NYU, tmp_path)
    (root / "val" / "normal" / "5.npy").unlink()
    with pytest.raises(ValueError) as err:
        NYUv2Dataset(root, "test", num_val=3)
    msg = str(err.value)
    assert str(root / "val" / "normal") in msg and "holds 5 files" in msg
    assert str(root / "val" / "image") in msg and "holds 6" in msg


def test_unmatched_file_names(tmp_path: Path) -> None:
    root = _copy(NYU, tmp_path)
    (root / "train" / "depth" / "3.npy").rename(root / "train" / "depth" / "7.npy")
    with pytest.raises(ValueError, match=r"no file matching .*3\.npy"):
        NYUv2Dataset(root, "train")


def test_corrupt_npy_is_reported_by_name(tmp_path: Path) -> None:
    root = _copy(NYU, tmp_path)
    (root / "train" / "image" / "2.npy").write_bytes(b"\x93NUMPY garbage")
    dataset = NYUv2Dataset(root, "train")
    dataset[0]  # other files still load
    with pytest.raises(ValueError) as err:
        dataset[2]
    assert str(root / "train" / "image" / "2.npy") in str(err.value)
    assert "corrupt" in str(err.value)


def test_label_out_of_range_is_reported_with_value(tmp_path: Path) -> None:
    root = _copy(NYU, tmp_path)
    label = np.load(root / "train" / "label" / "1.npy")
    label[3, 4] = 13.0
    np.save(root / "train" / "label" / "1.npy", label)
    dataset = NYUv2Dataset(root, "train")
    with pytest.raises(ValueError) as err:
        dataset[1]
    msg = str(err.value)
    assert "1.npy" in msg and "label value 13" in msg and "[-1, 13)" in msg
    label[3, 4] = -3.0
    np.save(root / "train" / "label" / "1.npy", label)
    with pytest.raises(ValueError, match="label value -3"):
        dataset[1]
    label[3, 4] = 2.5
    np.save(root / "train" / "label" / "1.npy", label)
    with pytest.raises(ValueError, match="whole numbers, found 2.5"):
        dataset[1]


def test_target_size_mismatch(tmp_path: Path) -> None:
    root = _copy(NYU, tmp_path)
    np.save(root / "train" / "depth" / "0.npy", np.ones((12, 16), np.float32))
    with pytest.raises(ValueError, match=r"0\.npy' is 12x16 but its image .* is 24x32"):
        NYUv2Dataset(root, "train")[0]


def test_num_val_leaving_an_empty_split() -> None:
    with pytest.raises(ValueError, match="'test' split is empty"):
        NYUv2Dataset(NYU, "test", num_val=6)
    with pytest.raises(ValueError, match="exceeds the 6 images"):
        NYUv2Dataset(NYU, "val", num_val=400)


# ----------------------------------------------------------------------------- Cityscapes
def test_cityscapes_splits() -> None:
    dm = CityscapesDataModule(str(CITY))
    dm.setup()
    train, val, test = (dm.datasets[s] for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (4, 1, 2)
    order = torch.randperm(5, generator=torch.Generator().manual_seed(42)).tolist()
    assert _stems(train) == [str(i) for i in sorted(order[:4])]
    assert _stems(val) == [str(order[4])]
    assert _stems(test) == ["0", "1"]
    assert all(f["image"].parent.parent.name == "val" for f in test.files)
    two = CityscapesDataset(CITY, "val", num_val=2)
    rest = CityscapesDataset(CITY, "train", num_val=2)
    assert len(two) == 2 and set(_stems(two)).isdisjoint(_stems(rest))
    assert sorted(_stems(two) + _stems(rest)) == ["0", "1", "2", "3", "4"]
    assert _stems(CityscapesDataset(CITY, "val", num_val=2)) == _stems(two)


def test_cityscapes_sample_and_invalid_disparity() -> None:
    dataset = CityscapesDataset(CITY, "test")
    sample = dataset[0]
    assert set(sample) == {"image", "segmentation", "part_segmentation", "disparity", "index"}
    assert sample["image"].shape == (3, 16, 32)
    raw = np.load(CITY / "val" / "depth" / "0.npy")[..., 0]
    assert sample["disparity"].shape == (1, 16, 32)
    assert (sample["disparity"][0, :2] == 0).all()  # 0 and -1 both become invalid 0
    assert torch.equal(sample["disparity"][0, 2:], torch.from_numpy(raw[2:]))
    assert sample["segmentation"].min() == -1 and sample["segmentation"].max() == 18
    assert sample["part_segmentation"].min() == -1 and sample["part_segmentation"].max() == 9
    seven = CityscapesDataset(CITY, "test", tasks=["segmentation"], classes=7)[0]
    label7 = np.load(CITY / "val" / "label_7" / "0.npy").astype(np.int64)
    assert torch.equal(seven["segmentation"], torch.from_numpy(label7))


def test_cityscapes_batches_and_class_count() -> None:
    dm = CityscapesDataModule(str(CITY), classes=7, crop=(8, 16), batch_size=4, eval_batch_size=2)
    assert dm.num_classes == {"segmentation": 7, "part_segmentation": 10}
    dm.setup("fit")
    batch = _batch(dm.train_dataloader())
    assert batch["image"].shape == (4, 3, 8, 16)
    assert batch["segmentation"].max() <= 6 and batch["segmentation"].min() >= -1
    assert batch["part_segmentation"].shape == (4, 8, 16)
    assert batch["disparity"].shape == (4, 1, 8, 16) and (batch["disparity"] >= 0).all()
    dm.setup("test")
    batch = _batch(dm.test_dataloader())
    assert batch["image"].shape == (2, 3, 16, 32)
    only = CityscapesDataModule(str(CITY), tasks=["disparity"])
    assert only.num_classes == {}
    with pytest.raises(ValueError, match="one of"):
        CityscapesDataModule(str(CITY), classes=20)


def test_cityscapes_label_out_of_range(tmp_path: Path) -> None:
    root = _copy(CITY, tmp_path)
    label = np.load(root / "train" / "label_7" / "3.npy")
    label[0, 5] = 9.0
    np.save(root / "train" / "label_7" / "3.npy", label)
    dataset = CityscapesDataset(root, "train", tasks=["segmentation"], classes=7, num_val=1)
    index = _stems(dataset).index("3")
    with pytest.raises(ValueError) as err:
        dataset[index]
    assert str(root / "train" / "label_7" / "3.npy") in str(err.value)
    assert "label value 9" in str(err.value) and "[-1, 7)" in str(err.value)


def test_cityscapes_missing_label_folder(tmp_path: Path) -> None:
    root = _copy(CITY, tmp_path)
    shutil.rmtree(root / "val" / "part_seg")
    with pytest.raises(FileNotFoundError) as err:
        CityscapesDataset(root, "test")
    assert str(root / "val" / "part_seg") in str(err.value) and "label_19/0.npy" in str(err.value)


# ----------------------------------------------------------------------------- Taskonomy
def _png(path: Path) -> np.ndarray:
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB) if array.ndim == 3 else array


def test_taskonomy_splits_by_building_with_caps() -> None:
    dm = TaskonomyDataModule(str(TASKONOMY), train_per_building=2, **BUILDINGS)
    assert dm.tasks == list(DEFAULT_TASKS) and dm.num_classes == {}
    dm.setup()
    train, val, test = (dm.datasets[s] for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (4, 2, 2)
    buildings = [f["image"].parent.name for f in train.files]
    assert buildings == ["allensville", "allensville", "coffeen", "coffeen"]
    order = torch.randperm(3, generator=torch.Generator().manual_seed(42)).tolist()
    names = [f"point_{i}_view_{i % 2}_domain_rgb" for i in range(3)]
    assert _stems(train)[:2] == [names[i] for i in sorted(order[:2])]
    again = TaskonomyDataset(TASKONOMY, ["allensville"], per_building=2, seed=42)
    assert _stems(again) == _stems(train)[:2]
    assert {f["image"].parent.name for f in test.files} == {"ihlen"}
    assert len(TaskonomyDataset(TASKONOMY, ["allensville"], per_building=None)) == 3
    with pytest.raises(ValueError, match="two splits"):
        TaskonomyDataModule(str(TASKONOMY), train_buildings=["ihlen"], test_buildings=["ihlen"])


def test_taskonomy_targets_match_the_stated_encodings() -> None:
    dataset = TaskonomyDataset(TASKONOMY, ["beechwood"], tasks=ALL_TASKONOMY, image_size=None)
    sample = dataset[1]
    files = dataset.files[1]
    raw = {folder: _png(path) for folder, path in files.items()}
    assert set(sample) == {*ALL_TASKONOMY, "image", "index"}
    image = torch.from_numpy(raw["image"]).permute(2, 0, 1).float() / 255
    assert torch.allclose(sample["image"], image)
    assert torch.allclose(sample["autoencoder"], image * 2 - 1)
    depth = torch.from_numpy(np.log1p(raw["depth_zbuffer"].astype(np.float32)) / math.log(2**16))
    assert sample["depth"].shape == (1, 32, 32)
    assert (sample["depth"][0, :4] == 0).all()  # mask_valid == 0
    assert torch.allclose(sample["depth"][0, 4:], depth[4:])
    assert 0 < sample["depth"].max() < 1
    normals = torch.from_numpy(raw["normal"]).permute(2, 0, 1).float() / 255 * 2 - 1
    assert torch.allclose(sample["normals"], normals)
    for task, high in (("keypoints2d", 3129.0), ("edge_texture", 11041.0)):
        expected = np.clip(raw[task].astype(np.float32), 0, high) / high * 2 - 1
        assert sample[task].shape == (1, 32, 32)
        assert torch.allclose(sample[task][0], torch.from_numpy(expected))
        assert sample[task].min() >= -1 and sample[task].max() == 1.0  # clipped values exist
    labels = torch.from_numpy(raw["segment_semantic"].astype(np.int64))
    assert sample["segmentation"].dtype == torch.int64
    assert torch.equal(sample["segmentation"], torch.where(labels == 0, -1, labels))
    assert sample["segmentation"][0, 0] == -1 and sample["segmentation"][0, 1] == 17


def test_taskonomy_resize_and_batches() -> None:
    dm = TaskonomyDataModule(
        str(TASKONOMY),
        tasks=ALL_TASKONOMY,
        image_size=16,
        batch_size=5,
        eval_batch_size=2,
        **BUILDINGS,
    )
    assert dm.num_classes == {"segmentation": 18}
    dm.setup()
    batch = _batch(dm.train_dataloader())
    assert batch["image"].shape == (5, 3, 16, 16)
    for task, channels in (
        ("autoencoder", 3),
        ("depth", 1),
        ("normals", 3),
        ("keypoints2d", 1),
        ("edge_texture", 1),
    ):
        assert batch[task].shape == (5, channels, 16, 16) and batch[task].dtype == torch.float32
    assert batch["segmentation"].shape == (5, 16, 16)
    assert (batch["depth"][:, :, :2] == 0).all()  # the masked rows survive nearest resizing
    batch = _batch(dm.val_dataloader())
    assert batch["image"].shape == (2, 3, 16, 16) and batch["index"].tolist() == [0, 1]


def test_taskonomy_training_augmentation() -> None:
    tasks = ["autoencoder", "depth", "normals", "segmentation"]
    dm = TaskonomyDataModule(
        str(TASKONOMY),
        tasks=tasks,
        image_size=None,
        crop=(16, 16),
        hflip=True,
        batch_size=5,
        **BUILDINGS,
    )
    dm.setup("fit")
    batch = _batch(dm.train_dataloader())
    assert batch["image"].shape == (5, 3, 16, 16) and batch["depth"].shape == (5, 1, 16, 16)
    assert torch.allclose(batch["autoencoder"], batch["image"] * 2 - 1)
    # every registered task moves with the image, so the continuous maps augment too
    assert {"keypoints2d", "edge_texture"} <= set(dense_keys())
    dm = TaskonomyDataModule(
        str(TASKONOMY), tasks=["keypoints2d", "edge_texture"], crop=(16, 16), **BUILDINGS
    )
    dm.setup("fit")
    batch = _batch(dm.train_dataloader())
    assert batch["keypoints2d"].shape[1:] == batch["edge_texture"].shape[1:] == (1, 16, 16)


def test_taskonomy_layout_errors(tmp_path: Path) -> None:
    root = _copy(TASKONOMY, tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        TaskonomyDataset(root, ["allensville", "stockman"])
    assert str(root / "rgb" / "stockman") in str(err.value) and "mask_valid" in str(err.value)
    shutil.rmtree(root / "mask_valid" / "coffeen")
    with pytest.raises(FileNotFoundError, match="mask_valid/coffeen"):
        TaskonomyDataset(root, ["coffeen"], tasks=["depth"])
    assert len(TaskonomyDataset(root, ["coffeen"], tasks=["normals"])) == 2
    (root / "edge_texture" / "allensville" / "point_2_view_0_domain_edge_texture.png").unlink()
    with pytest.raises(ValueError) as err:
        TaskonomyDataset(root, ["allensville"], tasks=["edge_texture"])
    msg = str(err.value)
    assert str(root / "edge_texture" / "allensville") in msg and "holds 2 files" in msg
    assert "holds 3" in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TaskonomyDataset(tmp_path / "nothing", ["allensville"])


def test_taskonomy_corrupt_png_and_bad_labels(tmp_path: Path) -> None:
    root = _copy(TASKONOMY, tmp_path)
    bad = root / "normal" / "ihlen" / "point_0_view_0_domain_normal.png"
    bad.write_bytes(b"\x89PNG truncated")
    dataset = TaskonomyDataset(root, ["ihlen"], tasks=["normals", "segmentation"], image_size=None)
    with pytest.raises(ValueError) as err:
        dataset[0]
    assert str(bad) in str(err.value) and "corrupt" in str(err.value)
    labels_path = root / "segment_semantic" / "ihlen" / "point_1_view_1_domain_segment_semantic.png"
    labels = _png(labels_path)
    labels[5, 5] = 200
    cv2.imwrite(str(labels_path), labels)
    with pytest.raises(ValueError) as err:
        dataset[1]
    assert str(labels_path) in str(err.value) and "label value 200" in str(err.value)
