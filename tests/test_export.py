"""``lightning_simo export`` -> ``SIMONet.from_pretrained`` gives the checkpoint's net exactly.

The export folder of the tiny merged run holds ``model.safetensors``, ``config.json`` and a model
card naming the merge, its α, the re-alignment, the sources' SHA-256 and the test metrics.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import TINY_VIT  # noqa: E402
from tiny_runs import SIZES, TASKS, TinyRuns, tiny_runs  # noqa: E402

from lightning_simo.checkpoints import file_sha256  # noqa: E402
from lightning_simo.cli import main  # noqa: E402
from lightning_simo.export import net_from_checkpoint  # noqa: E402
from lightning_simo.models.adapters import add_adapters  # noqa: E402
from lightning_simo.models.simo import SIMONet  # noqa: E402
from lightning_simo.modules.simo import SIMOModule  # noqa: E402
from lightning_simo.tasks import build_tasks  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> TinyRuns:
    return tiny_runs(tmp_path_factory)


def _batch() -> torch.Tensor:
    return torch.rand(
        3, 3, SIZES["height"], SIZES["width"], generator=torch.Generator().manual_seed(1)
    )


def _checkpoint_module(path: Path) -> SIMOModule:
    """The Lightning module as `test --ckpt_path` rebuilds it (hyper-parameters + weights)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hp = dict(ckpt["hyper_parameters"])
    hp["encoder"] = {**hp["encoder"], "checkpoint": None}
    module = SIMOModule(
        **{k: v for k, v in hp.items() if k in SIMOModule.__init__.__code__.co_varnames}
    )
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()


def test_export_then_from_pretrained_equals_the_checkpoint(runs: TinyRuns, tmp_path: Path) -> None:
    ckpt = runs.checkpoint(runs.merge)
    out = tmp_path / "exported"
    main(["export", str(ckpt), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]

    net = SIMONet.from_pretrained(out)
    reference = _checkpoint_module(ckpt)
    images = _batch()
    with torch.no_grad():
        got, expected = net(images), reference(images)
    assert sorted(got) == sorted(TASKS)
    for task in TASKS:
        assert torch.equal(got[task], expected[task]), task

    config = json.loads((out / "config.json").read_text())
    assert config["tasks"] == list(TASKS)
    assert config["num_classes"] == {"segmentation": 8}
    assert config["encoder"]["checkpoint"] is None and config["encoder"]["name"] == TINY_VIT["name"]

    card = (out / "README.md").read_text()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    merge = next(v for k, v in state["callbacks"].items() if k.startswith("MergeCallback"))
    for task in TASKS:
        digest = file_sha256(runs.checkpoint(runs.single[task]))
        assert merge["sources"][task] == digest
        assert digest in card
    assert "task_arithmetic" in card and "| re-alignment | heads |" in card
    assert f"| merge α | {merge['alpha']:g} |" in card
    metrics = json.loads((runs.merge / "test_metrics.json").read_text())["metrics"]
    assert (
        "delta_mtl_ratio" in metrics
        and f"| delta_mtl_ratio | {metrics['delta_mtl_ratio']:.4g} |" in card
    )
    assert file_sha256(ckpt) in card


def test_export_refuses_an_existing_folder_and_leaves_it(runs: TinyRuns, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(runs.checkpoint(runs.merge)), "--out", str(out)])
    assert exit_info.value.code == 2
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".taken")]


def test_single_task_checkpoint_exports_without_merge_facts(runs: TinyRuns, tmp_path: Path) -> None:
    ckpt = runs.checkpoint(runs.single["depth"])
    main(["export", str(ckpt), "--out", str(tmp_path / "depth")])
    card = (tmp_path / "depth" / "README.md").read_text()
    assert "Not a merged model" in card and "| test/depth/abs_err |" not in card
    assert "| depth/abs_err |" in card
    net = SIMONet.from_pretrained(tmp_path / "depth")
    reference, _ = net_from_checkpoint(ckpt)
    with torch.no_grad():
        assert torch.equal(net(_batch())["depth"], reference(_batch())["depth"])


def test_adapters_round_trip_through_a_pretrained_folder(tmp_path: Path) -> None:
    tasks = build_tasks(["segmentation", "normals"], {"segmentation": 5})
    net = SIMONet(tasks, TINY_VIT, {"kind": "linear", "upsample": 2})
    add_adapters(net.encoder, 3, "residual")
    with torch.no_grad():
        for p in net.encoder.adapters.parameters():
            p.add_(0.1 * torch.randn_like(p))  # adapters that change the output
    net.eval().save_pretrained(tmp_path / "net")
    again = SIMONet.from_pretrained(tmp_path / "net")
    assert json.loads((tmp_path / "net" / "config.json").read_text())["adapters"] == {
        "rank": 3,
        "form": "residual",
    }
    images = torch.rand(2, 3, 32, 40)
    with torch.no_grad():
        a, b = net(images), again(images)
    for task in tasks:
        assert torch.equal(a[task], b[task])


def test_from_pretrained_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        SIMONet.from_pretrained(tmp_path)


def test_push_to_hub_uses_huggingface_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No network: HfApi is replaced by a recorder."""
    import huggingface_hub

    calls: list[tuple[str, dict]] = []

    class Recorder:
        def create_repo(self, repo: str, **kwargs: object) -> None:
            calls.append(("create_repo", {"repo": repo, **kwargs}))

        def upload_folder(self, **kwargs: object) -> object:
            calls.append(("upload_folder", dict(kwargs)))
            return type("Commit", (), {"commit_url": "https://hub/commit"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", Recorder)
    from lightning_simo.export import push_to_hub

    assert push_to_hub(tmp_path, "me/model") == "https://hub/commit"
    assert calls[0] == ("create_repo", {"repo": "me/model", "exist_ok": True, "private": False})
    assert calls[1][1]["folder_path"] == str(tmp_path) and calls[1][1]["repo_id"] == "me/model"
