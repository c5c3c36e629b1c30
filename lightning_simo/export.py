"""``lightning_simo export``: a checkpoint -> a folder others can use without this suite's runs.

::

    lightning_simo export runs/synthetic/merge/task_arithmetic-heads/checkpoints/last.ckpt \\
        --out exports/task_arithmetic-heads [--metrics FILE] [--push_to_hub USER/REPO]

The folder follows the Hugging Face Hub layout (files at the top level)::

    model.safetensors   encoder (+ adapters) and every task head
    config.json         what SIMONet.from_pretrained needs to rebuild the net
    README.md           model card: tasks, merge method and α, re-alignment, sources (SHA-256),
                        test metrics and Δ_MTL when the run folder holds test_metrics.json

The checkpoint is read as data (``weights_only``); the folder is written next to its destination
and renamed into place once complete, so an interrupted export leaves nothing that looks done.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_simo.checkpoints import CheckpointError, _read_file, file_sha256
from lightning_simo.io import atomic_folder, atomic_write_text
from lightning_simo.models.simo import SIMONet
from lightning_simo.tasks import build_tasks

__all__ = ["ExportInfo", "export_checkpoint", "main", "model_card", "net_from_checkpoint"]

ExportInfo = dict[str, Any]
"""What the model card reports: checkpoint, merge state, metrics."""


def _merge_state(ckpt: Mapping[str, Any]) -> dict[str, Any] | None:
    for key, state in (ckpt.get("callbacks") or {}).items():
        if str(key).startswith("MergeCallback") and isinstance(state, Mapping):
            return dict(state)
    return None


def net_from_checkpoint(path: str | Path) -> tuple[SIMONet, dict[str, Any]]:
    """The SIMONet of a Lightning checkpoint of this suite, and the checkpoint dict itself."""
    ckpt = _read_file(Path(path))
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, Mapping) else None
    if not isinstance(hp, Mapping) or "tasks" not in hp or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{path} is not a checkpoint of a lightning_simo model (no hyper-parameters with "
            "tasks); export a checkpoint written by `lightning_simo fit`."
        )
    encoder = {**dict(hp.get("encoder") or {}), "checkpoint": None, "pretrained": False}
    tasks = build_tasks(list(hp["tasks"]), hp.get("num_classes"), hp.get("normal_loss", "cosine"))
    net = SIMONet(tasks, encoder, hp.get("head"))
    merge = _merge_state(ckpt)
    if merge and merge.get("realign") == "adapters":
        from lightning_simo.models.adapters import add_adapters

        add_adapters(net.encoder, int(merge["adapter_rank"]), str(merge["adapter_form"]))
    state = {k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(
            f"{path}: its weights do not form a plain SIMONet ({detail}); models whose merged "
            "weights live outside the net (realign: tinting / adamerging) cannot be exported yet."
        )
    net.load_state_dict(state, strict=True)
    return net.eval(), ckpt


def _metrics_for(path: Path, metrics: str | None) -> dict[str, Any] | None:
    candidate = Path(metrics) if metrics else path.parent.parent / "test_metrics.json"
    if not candidate.is_file():
        if metrics:
            raise FileNotFoundError(f"Metrics file {metrics!r} not found (--metrics).")
        return None
    data = json.loads(candidate.read_text())
    return dict(data.get("metrics", data))


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(config: Mapping[str, Any], info: ExportInfo) -> str:
    """The ``README.md`` of an exported folder (Hub metadata header, then the facts)."""
    merge = info.get("merge")
    tasks = config["tasks"]
    lines = [
        "---",
        "library_name: lightning_simo",
        "tags: [dense-prediction, multi-task-learning, model-merging, " + ", ".join(tasks) + "]",
        "---",
        "",
        f"# {info['name']}",
        "",
        "A single-input multi-output dense prediction network exported by `lightning_simo "
        "export`: one shared encoder, one head per task.",
        "",
        "| | |",
        "|---|---|",
        f"| tasks | {', '.join(tasks)} |",
        f"| encoder | timm `{config['encoder']['name']}` ({_fmt(config['encoder']['model_kwargs'])}) |",
        f"| head | {config['head'].get('kind', 'linear')} |",
        f"| class counts | {_fmt(config['num_classes']) if config['num_classes'] else 'none'} |",
        f"| input | RGB in [0, 1], scaling `{config['input']['scaling']}` |",
        f"| exported from | `{info['checkpoint']}` (sha256 `{info['checkpoint_sha256']}`) |",
    ]
    if merge:
        alpha = merge.get("alpha")
        options = merge.get("method_options") or {}
        lines += [
            f"| merge method | {merge.get('method')}"
            + (f" ({_fmt(options)})" if options else "")
            + " |",
            f"| merge α | {_fmt(alpha) if alpha is not None else 'none (method has no α)'} |",
            f"| re-alignment | {merge.get('realign')}"
            + (
                f" (rank {merge.get('adapter_rank')}, {merge.get('adapter_form')})"
                if merge.get("realign") == "adapters"
                else ""
            )
            + " |",
        ]
        lines += ["", "## Sources", "", "| task | checkpoint | sha256 |", "|---|---|---|"]
        paths = merge.get("paths") or {}
        for task, digest in (merge.get("sources") or {}).items():
            lines.append(f"| {task} | `{paths.get(task, '?')}` | `{digest}` |")
        scores = merge.get("search_scores") or {}
        if scores:
            lines += ["", "α search (mean normalised performance on val):", ""]
            lines.append(", ".join(f"{float(a):g}: {float(s):.4f}" for a, s in scores.items()))
    else:
        lines += ["", "Not a merged model (no MergeCallback state in the checkpoint)."]
    metrics = info.get("metrics")
    lines += ["", "## Test metrics", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items())]
        if "delta_mtl_ratio" not in metrics:
            lines += ["", "Δ_MTL unknown: test with `model.reference_metrics` to report it."]
    else:
        lines.append("Unknown: no test_metrics.json next to the checkpoint's run (--metrics).")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from lightning_simo.models.simo import SIMONet",
        "",
        'net = SIMONet.from_pretrained("path/to/this/folder")  # plain torch + timm',
        "outputs = net(images)  # images: B x 3 x H x W in [0, 1] -> {task: B x C x H x W}",
        "```",
        "",
    ]
    return "\n".join(lines)


def export_checkpoint(
    checkpoint: str | Path, out: str | Path, metrics: str | None = None, force: bool = False
) -> Path:
    """Write the export folder of ``checkpoint`` at ``out`` (refusing a non-empty ``out``
    unless ``force``)."""
    src, dest = Path(checkpoint), Path(out)
    with atomic_folder(dest, force) as tmp:  # refuses a non-empty `out` before any work
        net, ckpt = net_from_checkpoint(src)
        info: ExportInfo = {
            "name": dest.name,
            "checkpoint": str(src),
            "checkpoint_sha256": file_sha256(src),
            "merge": _merge_state(ckpt),
            "metrics": _metrics_for(src, metrics),
        }
        net.save_pretrained(tmp)
        atomic_write_text(tmp / "README.md", model_card(net.config_dict(), info))
    return dest


def push_to_hub(folder: Path, repo: str, private: bool = False) -> str:
    """Upload ``folder`` to the Hub repository ``repo`` (needs ``huggingface_hub`` and a token)."""
    try:
        from huggingface_hub import HfApi
    except ImportError as err:
        raise ValueError(
            "--push_to_hub needs huggingface_hub: pip install 'lightning_simo[hub]'."
        ) from err
    api = HfApi()
    api.create_repo(repo, exist_ok=True, private=private)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message="export")
    return str(getattr(commit, "commit_url", repo))


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lightning_simo export",
        description="Export a checkpoint as model.safetensors + config.json + README.md.",
    )
    parser.add_argument("checkpoint", help="a .ckpt written by `lightning_simo fit`")
    parser.add_argument("--out", required=True, help="the folder to write (must not exist)")
    parser.add_argument("--metrics", help="test_metrics.json to report (default: the run's)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument("--push_to_hub", metavar="REPO", help="also upload to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")
    ns = parser.parse_args(args)
    dest = export_checkpoint(ns.checkpoint, ns.out, ns.metrics, ns.force)
    print(f"[export] wrote {dest}/ (model.safetensors, config.json, README.md)")
    if ns.push_to_hub:
        print(f"[export] pushed to {push_to_hub(dest, ns.push_to_hub, ns.private)}")
