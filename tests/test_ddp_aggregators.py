"""Two-process CPU DDP with gradient aggregators and FAMO: every rank ends with the same weights.

A representative subset, to keep the file short on two shared cores: UPGrad on the parameter
jacobian (all-reduced before aggregation), PCGrad on the feature jacobian (Gramian summed over
ranks; randomised, seeded), GradVac (stateful and randomised) and FAMO (a loss weighting whose
after-step update reads rank-averaged losses). The aggregators run under plain ``ddp`` (no
unused-parameter search): the surrogate backward reaches every trainable parameter.

Workers are started the way ``tests/test_ddp.py`` starts them (one process per ``LOCAL_RANK``).
Run directly, this file is the worker: ``python tests/test_ddp_aggregators.py OUT CASE ...``.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import TINY_VIT  # noqa: E402
from test_ddp import WORLD_SIZE, _assert_same_state, _cpu_state, _launch  # noqa: E402

from lightning_simo.data.synthetic import SyntheticDataModule  # noqa: E402
from lightning_simo.modules.joint import JointMTLModule  # noqa: E402

TASKS = ["segmentation", "depth", "normals"]
TIMEOUT_S = 300
#: case -> (weighting, module options, strategy)
CASES: dict[str, tuple[str, dict[str, Any], str]] = {
    "upgrad": ("upgrad", {}, "ddp"),
    "pcgrad_features": ("pcgrad", {"jacobian_of": "features"}, "ddp"),
    "gradvac": ("gradvac", {}, "ddp"),
    "famo": ("famo", {}, "ddp_find_unused_parameters_true"),
}


def run_case(name: str, root: Path) -> None:
    weighting, options, strategy = CASES[name]
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0, verbose=False)
    module = JointMTLModule(
        tasks=TASKS,
        num_classes={"segmentation": 8},
        encoder={**TINY_VIT, "model_kwargs": dict(TINY_VIT["model_kwargs"])},
        head={"kind": "linear", "upsample": 4},
        schedule="constant",
        lr=1e-2,
        weighting=weighting,
        **options,
    )
    initial = _cpu_state(module)
    data = SyntheticDataModule(
        tasks=TASKS,
        num_train=16,
        num_val=8,
        num_test=8,
        height=32,
        width=40,
        batch_size=4,
        augment=False,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD_SIZE,
        strategy=strategy,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=out,
    )
    trainer.fit(module, datamodule=data)
    rank = trainer.global_rank
    torch.save(initial, out / f"initial_rank{rank}.pt")
    torch.save(_cpu_state(module), out / f"final_rank{rank}.pt")


def _worker(argv: list[str]) -> None:
    root = Path(argv[0])
    for name in argv[1:]:
        try:
            run_case(name, root)
        except BaseException:
            rank = os.environ.get("LOCAL_RANK", "?")
            (root / name).mkdir(parents=True, exist_ok=True)
            (root / name / f"error_rank{rank}.txt").write_text(traceback.format_exc())
            raise


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp_aggregators")
    _launch(root, list(CASES), script=__file__, timeout=TIMEOUT_S)
    return root


pytestmark = pytest.mark.slow


@pytest.mark.parametrize("case", list(CASES))
def test_ranks_end_with_identical_weights(root: Path, case: str) -> None:
    files = [root / case / f"final_rank{r}.pt" for r in range(WORLD_SIZE)]
    if not all(f.is_file() for f in files):
        errors = sorted((root / case).glob("error_rank*.txt"))
        logs = [(root / f"worker{r}.log").read_text()[-3000:] for r in range(WORLD_SIZE)]
        pytest.fail("\n".join(p.read_text() for p in errors) or "\n".join(logs))
    finals = [torch.load(f, weights_only=True) for f in files]
    _assert_same_state(finals)
    initial = torch.load(root / case / "initial_rank0.pt", weights_only=True)
    moved = [
        k
        for k in initial
        if k.startswith("net.encoder") and not torch.equal(initial[k], finals[0][k])
    ]
    assert moved, "the encoder did not train"
    weighting_state = {k for k in finals[0] if k.startswith("weighting.")}
    if case in ("gradvac", "famo", "pcgrad_features"):
        assert weighting_state  # the state that must agree across ranks is in the state dict


if __name__ == "__main__":
    _worker(sys.argv[1:])
