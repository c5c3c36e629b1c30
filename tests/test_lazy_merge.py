"""Lazy merging from safetensors, the sharded writer and the ``merge`` command.

The lazy path must give the in-memory ``merge`` bit for bit (SHA-256 of every tensor) for every
registered method, read sharded Hugging Face folders, write shards no larger than asked, and
refuse truncated or incomplete inputs with one error line and no output left behind.
"""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from lightning_simo.checkpoints import (
    encoder_state_dict,
    file_sha256,
    head_state_dicts,
    load_state_dict,
)
from lightning_simo.data.synthetic import SyntheticDataModule
from lightning_simo.merge_cli import METADATA_KEY, main
from lightning_simo.merging import MERGE_METHODS, merge
from lightning_simo.merging.lazy import INDEX_NAME, LazyStateDict, merge_lazily
from lightning_simo.merging.methods import iter_merge
from lightning_simo.merging.sharded import parse_size, write_sharded
from lightning_simo.merging.statistics import statistics_of
from lightning_simo.modules.simo import SIMOModule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import TINY_VIT  # noqa: E402

TASKS = ("segmentation", "depth", "normals")
HEAD = {"kind": "linear", "upsample": 4}
REPO = Path(__file__).resolve().parents[1]

# every registered method with its defaults, plus the variants that change how it streams
# data-based methods (regmean, fisher) take statistics gathered by the MergeCallback on images
DATA_FREE = [n for n in MERGE_METHODS.names() if not statistics_of(n)]
VARIANTS: list[tuple[str, dict[str, Any]]] = [(name, {}) for name in DATA_FREE] + [
    ("task_arithmetic", {"scaling": 0.3, "bn_stats": "pretrained"}),
    ("ties", {"density": 0.5, "trim_scope": "tensor", "merge_rule": "sum"}),
    ("dare", {"drop_rate": 0.5, "base": "ties", "seed": 3}),
]


def _sha(tensor: Tensor) -> str:
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def _hashes(state: dict[str, Tensor]) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    return {k: (_sha(v), str(v.dtype), tuple(v.shape)) for k, v in state.items()}


def _state_dict(base: dict[str, Tensor] | None, seed: int) -> dict[str, Tensor]:
    """A small model: fp16 weights, a BN statistic, an integer counter, a scalar."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {"blocks.0.w": (96, 40), "blocks.0.b": (96,), "blocks.1.w": (7, 9, 5), "s": ()}
    state = {}
    for key, shape in shapes.items():
        noise = 0.1 * torch.randn(shape, generator=generator)
        state[key] = (noise if base is None else base[key].float() + noise).half()
    state["bn.running_var"] = torch.rand(8, generator=generator) + (0 if base is None else 1)
    state["bn.num_batches_tracked"] = torch.tensor(seed)
    return state


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lazy")
    theta0 = _state_dict(None, 0)
    finetuned = [_state_dict(theta0, 1 + i) for i in range(3)]
    save_file(theta0, str(root / "theta0.safetensors"))
    paths = []
    for i, state in enumerate(finetuned[:2]):
        save_file(state, str(root / f"ft{i}.safetensors"))
        paths.append(root / f"ft{i}.safetensors")
    # the third one sharded, Hugging Face layout (keys split over two shards)
    write_sharded(sorted(finetuned[2].items()), root / "ft2", max_shard_size=8000)
    paths.append(root / "ft2")
    return {"theta0": theta0, "finetuned": finetuned, "root": root, "paths": paths}


@pytest.mark.parametrize(("method", "options"), VARIANTS)
def test_lazy_merge_equals_the_in_memory_merge_bit_for_bit(
    files: dict[str, Any], method: str, options: dict[str, Any]
) -> None:
    expected = _hashes(merge(files["theta0"], files["finetuned"], method, **options))
    theta0 = LazyStateDict(files["root"] / "theta0.safetensors")
    finetuned = [LazyStateDict(p) for p in files["paths"]]
    for chunk in (None, 500):  # whole tensors, and row blocks of 500 coordinates
        got = dict(merge_lazily(theta0, finetuned, method, chunk_numel=chunk, **options))
        assert _hashes(got) == expected
        assert list(got) == list(theta0)
    streamed = dict(iter_merge(files["theta0"], files["finetuned"], method, **options))
    assert _hashes(streamed) == expected


def test_sharded_input_reads_every_tensor_of_every_shard(files: dict[str, Any]) -> None:
    folder = files["paths"][2]
    index = json.loads((folder / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) == 2
    lazy = LazyStateDict(folder)
    assert _hashes(dict(lazy)) == _hashes(files["finetuned"][2])
    assert lazy.metadata()["blocks.0.w"].shape == (96, 40)
    assert lazy.metadata()["blocks.0.w"].device.type == "meta"


def test_writer_respects_the_shard_size_and_round_trips(
    files: dict[str, Any], tmp_path: Path
) -> None:
    merged = merge(files["theta0"], files["finetuned"], "ties")
    written = write_sharded(merged.items(), tmp_path / "out", "4KB", {"note": "x"})
    shards = written[1:]
    assert written[0].name == INDEX_NAME and len(shards) >= 2
    for shard in shards:
        sizes = LazyStateDict(shard)
        payload = sum(t.numel() * t.element_size() for t in sizes.metadata().values())
        assert payload <= 4_000 or len(sizes) == 1
    back = LazyStateDict(tmp_path / "out")
    assert _hashes(dict(back)) == _hashes(merged)
    assert back.file_metadata() == {"note": "x"}
    index = json.loads(written[0].read_text())
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in merged.values()
    )


def test_an_error_while_writing_leaves_no_output(files: dict[str, Any], tmp_path: Path) -> None:
    def failing():
        yield "a", torch.zeros(3)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_sharded(failing(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_parse_size_units_and_errors() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5 MB") == 1_500_000
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")


# ---------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """θ0 as a Lightning-style checkpoint; three single-task models saved three ways."""
    root = tmp_path_factory.mktemp("merge_cli")
    num_classes = SyntheticDataModule(tasks=list(TASKS)).num_classes
    torch.manual_seed(0)
    base = SIMOModule(tasks=list(TASKS), num_classes=num_classes, encoder=copy.deepcopy(TINY_VIT))
    theta0 = {k: v.clone() for k, v in base.net.encoder.state_dict().items()}
    foundation = root / "foundation.ckpt"
    torch.save({"state_dict": {"encoder." + k: v for k, v in theta0.items()}}, foundation)
    sources, states = {}, {}
    for i, task in enumerate(TASKS):
        torch.manual_seed(1 + i)
        module = SIMOModule(
            tasks=[task], num_classes=num_classes, encoder=copy.deepcopy(TINY_VIT), head=HEAD
        )
        module.net.encoder.load_state_dict(theta0)
        with torch.no_grad():
            for p in module.net.parameters():
                p.add_(0.01 * torch.randn_like(p))
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        states[task] = state
        if task == "segmentation":
            path = root / "seg.ckpt"
            torch.save({"state_dict": state}, path)
        elif task == "depth":
            path = root / "depth.safetensors"
            save_file(state, str(path))
        else:
            path = root / "normals"
            write_sharded(state.items(), path, max_shard_size="100KB")
        sources[task] = str(path)
    return {
        "root": root,
        "foundation": str(foundation),
        "sources": sources,
        "states": states,
        "theta0": theta0,
        "num_classes": num_classes,
    }


def _config(models: dict[str, Any], out: Path, **extra: Any) -> Path:
    config = {
        "method": "ties",
        "options": {"density": 0.3, "scaling": 0.8},
        "pretrained": models["foundation"],
        "sources": models["sources"],
        "output": str(out),
        "progress": False,
        **extra,
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def test_merge_command_writes_merged_encoder_heads_and_provenance(
    models: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    main(["--config", str(_config(models, out, device="cpu"))])
    finetuned = [encoder_state_dict(models["states"][t]) for t in TASKS]
    expected = merge(models["theta0"], finetuned, "ties", density=0.3, scaling=0.8)
    written = load_state_dict(out / "model.safetensors")
    assert _hashes(encoder_state_dict(written)) == _hashes(expected)
    heads = head_state_dicts(written)
    for task in TASKS:
        assert _hashes(heads[task]) == _hashes(head_state_dicts(models["states"][task])[task])
    # the output is a SIMONet state dict: a module starts from it with init_from
    module = SIMOModule(
        tasks=list(TASKS),
        num_classes=models["num_classes"],
        encoder=copy.deepcopy(TINY_VIT),
        head=HEAD,
        init_from=str(out / "model.safetensors"),
    )
    assert torch.equal(
        module.net.encoder.state_dict()["backbone.blocks.0.mlp.fc1.weight"],
        expected["backbone.blocks.0.mlp.fc1.weight"],
    )
    provenance = json.loads(LazyStateDict(out).file_metadata()[METADATA_KEY])
    assert provenance["method"] == "ties"
    assert provenance["sources"]["depth"]["sha256"] == file_sha256(models["sources"]["depth"])
    assert provenance["pretrained"]["sha256"] == file_sha256(models["foundation"])
    assert len(provenance["sources"]["normals"]["sha256"]) == 64


def test_merge_command_shards_the_output(models: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "sharded"
    main(
        ["--config", str(_config(models, out, max_shard_size="50KB", method="average", options={}))]
    )
    assert (out / INDEX_NAME).is_file()
    finetuned = [encoder_state_dict(models["states"][t]) for t in TASKS]
    expected = merge(models["theta0"], finetuned, "average")
    assert _hashes(encoder_state_dict(dict(LazyStateDict(out)))) == _hashes(expected)


def _run_cli(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lightning_simo", "merge", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )


def test_truncated_shard_and_missing_shard_give_one_error_line_and_no_output(
    models: dict[str, Any], tmp_path: Path
) -> None:
    import shutil

    broken = tmp_path / "normals"
    shutil.copytree(models["sources"]["normals"], broken)
    shards = sorted(broken.glob("model-*.safetensors"))
    data = shards[-1].read_bytes()
    shards[-1].write_bytes(data[: len(data) // 2])
    truncated = _config(
        {**models, "sources": {**models["sources"], "normals": str(broken)}}, tmp_path / "out1"
    )
    missing_dir = tmp_path / "missing"
    shutil.copytree(models["sources"]["normals"], missing_dir)
    sorted(missing_dir.glob("model-*.safetensors"))[0].unlink()
    missing = _config(
        {**models, "sources": {**models["sources"], "normals": str(missing_dir)}},
        tmp_path / "out2",
    )
    for config, reason in ((truncated, "truncated"), (missing, "do not exist")):
        result = _run_cli(config)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, result.stderr
        assert len(lines) == 1 and lines[0].startswith("lightning_simo: error: ")
        assert reason in lines[0]
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_merge_command_refuses_bad_settings(models: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no CUDA GPU"):
        main(["--config", str(_config(models, tmp_path / "a", device="cuda"))])
    with pytest.raises(ValueError, match="option 'density'"):
        main(["--config", str(_config(models, tmp_path / "b", options={"density": 2}))])
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="already exists"):
        main(["--config", str(_config(models, tmp_path / "c"))])
    wrong = {**models["sources"], "depth": models["sources"]["segmentation"]}
    with pytest.raises(ValueError, match="no head for it"):
        main(["--config", str(_config({**models, "sources": wrong}, tmp_path / "d"))])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_lazy_merging_imports_without_lightning() -> None:
    """Lazy merges of large models run in processes that never import Lightning (about 0.3 GB
    of resident memory)."""
    code = (
        "import sys, lightning_simo.merging.lazy, lightning_simo.merging.sharded\n"
        "print(sorted(m for m in ('lightning', 'timm', 'torchmetrics') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
