"""Checkpoint I/O: safe loading, key selection, atomic saving."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_simo.checkpoints import (
    CheckpointError,
    encoder_state_dict,
    extract_prefix,
    file_sha256,
    head_state_dicts,
    load_state_dict,
    save_state_dict_atomic,
)


def _weights() -> dict[str, torch.Tensor]:
    return {
        "net.encoder.backbone.blocks.0.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        "net.encoder.backbone.norm.bias": torch.tensor([0.5, -0.5]),
        "net.encoder.adapters.0.down.weight": torch.tensor([[7.0, 8.0]]),
        "net.heads.depth.conv.weight": torch.tensor([[9.0]]),
        "net.heads.depth.bn.num_batches_tracked": torch.tensor(3),
        "net.heads.semseg.conv.bias": torch.tensor([1.0, 2.0, 3.0]),
    }


def _assert_same(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], ordered: bool = True
) -> None:
    """Same keys, dtypes and values; safetensors files store keys sorted, hence ``ordered``."""
    assert (list(a) == list(b)) if ordered else (sorted(a) == sorted(b))
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


class _Evil:
    """Unpickling this object opens (creates) a file: the kind of code a checkpoint may hide."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_lightning_style_checkpoint_round_trip(tmp_path: Path) -> None:
    ckpt = {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.6.0",
        "state_dict": {**_weights(), "net.encoder._extra": "not a tensor"},
        "hyper_parameters": {"lr": 1e-4, "tasks": ["semseg", "depth"]},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4}]}],
    }
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    loaded = load_state_dict(path)
    _assert_same(loaded, _weights())  # the non-tensor entry is dropped


def test_checkpoint_written_by_a_trainer_loads(tmp_path: Path) -> None:
    class Tiny(L.LightningModule):
        def __init__(self, lr: float = 0.1, tasks: tuple[str, ...] = ("depth",)) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.layer = nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.layer(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(4, 2), torch.randn(4, 1)), batch_size=2)
    model = Tiny()
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    trainer.fit(model, data)
    path = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(path)
    loaded = load_state_dict(path)
    _assert_same(loaded, dict(model.state_dict()))


def test_model_key_and_plain_state_dict(tmp_path: Path) -> None:
    torch.save({"model": _weights(), "step": 5}, tmp_path / "a.pt")
    torch.save(_weights(), tmp_path / "b.pt")
    _assert_same(load_state_dict(tmp_path / "a.pt"), _weights())
    _assert_same(load_state_dict(str(tmp_path / "b.pt")), _weights())


def test_dict_without_state_dict_is_an_error(tmp_path: Path) -> None:
    torch.save({"epoch": 1, "weights_here": [1, 2]}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"has no state dict.*'epoch'"):
        load_state_dict(tmp_path / "odd.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list"):
        load_state_dict(tmp_path / "list.pt")


def test_safetensors_round_trip_with_shared_and_strided_tensors(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {
        "a": base,
        "a_alias": base,  # same storage: safetensors refuses unless cloned
        "column": base[:, 1],  # non-contiguous view
        "half": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "count": torch.tensor(7),
    }
    path = tmp_path / "w.safetensors"
    save_state_dict_atomic(state, path)
    loaded = load_state_dict(path)
    assert sorted(loaded) == sorted(state)
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype
        assert torch.equal(loaded[key], value), key
    assert torch.equal(loaded["column"], torch.tensor([1.0, 5.0, 9.0]))
    assert torch.equal(base, torch.arange(12, dtype=torch.float32).reshape(3, 4))


def test_pickled_code_is_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "created_by_unpickling.txt"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": _Evil(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    message = str(info.value)
    assert str(path) in message
    assert "pickled code/objects" in message
    assert "not executed" in message
    assert "safetensors" in message
    assert "\n" not in message
    assert not marker.exists()


def test_truncated_file_is_reported(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save(_weights(), good)
    data = good.read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"bad\.pt: not a readable checkpoint"):
        load_state_dict(bad)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_state_dict(empty)


def test_truncated_safetensors_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_state_dict_atomic({"a": torch.ones(8)}, path)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_state_dict(path)


def test_missing_file_names_path_and_next_step(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "depth" / "last.ckpt"
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    assert str(path) in str(info.value)
    assert "run the stage that produces it" in str(info.value)
    with pytest.raises(CheckpointError, match="is a directory"):
        load_state_dict(tmp_path)


def test_extract_prefix() -> None:
    out = extract_prefix(_weights(), "net.heads.depth.")
    assert list(out) == ["conv.weight", "bn.num_batches_tracked"]
    assert torch.equal(out["conv.weight"], torch.tensor([[9.0]]))
    assert extract_prefix(_weights(), "nothing.") == {}


def test_encoder_state_dict_from_simo_module() -> None:
    enc = encoder_state_dict(_weights())
    assert list(enc) == ["backbone.blocks.0.weight", "backbone.norm.bias"]
    assert torch.equal(enc["backbone.norm.bias"], torch.tensor([0.5, -0.5]))
    with_adapters = encoder_state_dict(_weights(), include_adapters=True)
    assert list(with_adapters) == [
        "backbone.blocks.0.weight",
        "backbone.norm.bias",
        "adapters.0.down.weight",
    ]


def test_encoder_state_dict_from_foundation_module_and_timm() -> None:
    foundation = {
        "encoder.backbone.cls_token": torch.zeros(1, 1, 2),
        "encoder.backbone.pos_embed": torch.ones(1, 3, 2),
        "decoder.weight": torch.ones(2),
    }
    assert list(encoder_state_dict(foundation)) == ["backbone.cls_token", "backbone.pos_embed"]
    timm_raw = {"cls_token": torch.zeros(1, 1, 2), "blocks.0.attn.qkv.weight": torch.ones(6, 2)}
    enc = encoder_state_dict(timm_raw)
    assert list(enc) == ["backbone.cls_token", "backbone.blocks.0.attn.qkv.weight"]
    assert enc["backbone.cls_token"] is timm_raw["cls_token"]


def test_encoder_state_dict_uses_first_encoder_prefix() -> None:
    state = {
        "net.encoder.backbone.w": torch.tensor([1.0]),
        "teacher.encoder.backbone.w": torch.tensor([2.0]),
    }
    enc = encoder_state_dict(state)
    assert list(enc) == ["backbone.w"]
    assert torch.equal(enc["backbone.w"], torch.tensor([1.0]))


def test_encoder_state_dict_of_an_encoder_module() -> None:
    state = {"backbone.w": torch.tensor([1.0]), "adapters.0.up": torch.tensor([2.0])}
    assert list(encoder_state_dict(state)) == ["backbone.w"]
    assert list(encoder_state_dict(state, include_adapters=True)) == ["backbone.w", "adapters.0.up"]


def test_head_state_dicts() -> None:
    heads = head_state_dicts(_weights())
    assert list(heads) == ["depth", "semseg"]
    assert list(heads["depth"]) == ["conv.weight", "bn.num_batches_tracked"]
    assert torch.equal(heads["semseg"]["conv.bias"], torch.tensor([1.0, 2.0, 3.0]))
    bare = {"heads.normal.proj.weight": torch.ones(1), "encoder.backbone.w": torch.ones(1)}
    assert list(head_state_dicts(bare)) == ["normal"]
    assert head_state_dicts({"encoder.backbone.w": torch.ones(1)}) == {}


def test_atomic_save_leaves_no_temporary_files(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    save_state_dict_atomic(_weights(), out / "encoder.pt")
    save_state_dict_atomic(_weights(), out / "encoder.safetensors")
    save_state_dict_atomic({"x": torch.zeros(1)}, out / "encoder.pt")  # overwrite
    assert sorted(p.name for p in out.iterdir()) == ["encoder.pt", "encoder.safetensors"]
    _assert_same(load_state_dict(out / "encoder.pt"), {"x": torch.zeros(1)})
    _assert_same(load_state_dict(out / "encoder.safetensors"), _weights(), ordered=False)


def test_failed_save_keeps_old_file_and_removes_temporary(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    save_state_dict_atomic({"x": torch.ones(2)}, path)
    with pytest.raises(Exception):  # noqa: B017 - any serialisation failure
        save_state_dict_atomic(
            {"x": _Evil(str(tmp_path / "never"))}, path.with_suffix(".safetensors")
        )
    with pytest.raises(Exception):  # noqa: B017
        save_state_dict_atomic({"x": lambda: None}, path)  # type: ignore[dict-item]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]
    _assert_same(load_state_dict(path), {"x": torch.ones(2)})


def test_file_sha256(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"abc")
    expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert file_sha256(path) == expected
    assert file_sha256(path, chunk_size=1) == expected
