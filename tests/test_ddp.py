"""Two-process DDP on CPU (gloo): what every rank trains, merges, caches and reports.

The tests start two worker processes the way torchrun or ``srun`` would (each with its own
``LOCAL_RANK``, one shared ``MASTER_PORT``): Lightning then joins them into one process group
instead of launching children itself, and both ranks import in parallel, which keeps the file
fast. The workers run every case once (module-scoped fixture); each case writes, per rank, the
state dict right after ``setup`` (merge, adapter injection and freezing done, DDP not yet
wrapped), the state dict after training, and the metrics of a DDP ``validate`` and ``test``.
The tests then check, case by case, that

- both ranks hold identical weights after ``setup`` (the merge is deterministic on every rank)
  and after training (DDP kept them in step), BatchNorm statistics included;
- the merged encoder is the single-process merge, and what was frozen in ``setup`` stayed so;
- validation and test metrics synced from both ranks (mIoU from the summed confusion matrix)
  equal a single-process evaluation of the same weights on the same data;
- each rank's ``FeatureCache`` holds exactly the samples that rank was given.

Data sizes are multiples of world size x batch size, so the distributed sampler neither pads
nor repeats samples and the synced metrics cover each sample once.

Run directly, this file is the worker: ``python tests/test_ddp.py OUT CASE [CASE ...]``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor
from torch.utils.data import DistributedSampler

from lightning_simo.callbacks.merge import MergeCallback
from lightning_simo.callbacks.realign import FeatureCache, apply_realign_mode
from lightning_simo.checkpoints import encoder_state_dict, load_state_dict
from lightning_simo.data.synthetic import SyntheticDataModule
from lightning_simo.evaluation import evaluate_net
from lightning_simo.merging import merge
from lightning_simo.models.encoders import Encoder
from lightning_simo.modules.joint import JointMTLModule
from lightning_simo.modules.simo import SIMOModule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import TINY_VIT  # noqa: E402

WORLD_SIZE = 2
TASKS = ("segmentation", "depth", "normals")
HEAD = {"kind": "linear", "upsample": 4}
SIZES = {"num_train": 16, "num_val": 8, "num_test": 8, "height": 32, "width": 40, "batch_size": 4}
WORKER_TIMEOUT_S = 600
SEARCH_GRID = (0.5, 1.0)
ADAPTER_RANK = 4


def _datamodule(tasks: tuple[str, ...]) -> SyntheticDataModule:
    return SyntheticDataModule(tasks=list(tasks), augment=False, **SIZES)


# ---------------------------------------------------------------------------- the cases
@dataclass(frozen=True)
class Case:
    """One DDP run: the module, its merge (if any) and how the Trainer distributes it.

    ``strategy`` is ``ddp_find_unused_parameters_true`` wherever some trainable parameter gets
    no gradient in a step: the encoder during a linear probe, and the ViT's final norm, which
    the heads never read (they take un-normalised block outputs).
    """

    tasks: tuple[str, ...]
    strategy: str
    module: Callable[[dict[str, Any]], SIMOModule]
    merge: dict[str, Any] | None = None
    epochs: int = 2


def _simo(tasks: tuple[str, ...], **kwargs: Any) -> Callable[[dict[str, Any]], SIMOModule]:
    def build(encoder: dict[str, Any]) -> SIMOModule:
        return SIMOModule(
            tasks=list(tasks),
            num_classes=_datamodule(tasks).num_classes,
            encoder=encoder,
            head=HEAD,
            schedule="constant",
            **kwargs,
        )

    return build


def _joint(weighting: str, **options: Any) -> Callable[[dict[str, Any]], SIMOModule]:
    def build(encoder: dict[str, Any]) -> SIMOModule:
        return JointMTLModule(
            tasks=list(TASKS),
            num_classes=_datamodule(TASKS).num_classes,
            encoder=encoder,
            head=HEAD,
            schedule="constant",
            lr=1e-3,
            weighting=weighting,
            weighting_options=options,
        )

    return build


CASES: dict[str, Case] = {
    "single_task": Case(
        ("segmentation",),
        "ddp_find_unused_parameters_true",
        _simo(("segmentation",), lr=1e-3, probe_epochs=1),
    ),
    "merge_heads": Case(
        TASKS,
        "ddp",
        _simo(TASKS, head_lr=1e-2),
        merge={
            "scaling": "search",
            "search_grid": SEARCH_GRID,
            "realign": "heads",
            "cache_features": True,
        },
    ),
    "merge_adapters": Case(
        TASKS,
        "ddp",
        _simo(TASKS, lr=1e-2),
        merge={"scaling": 0.5, "realign": "adapters", "adapter_rank": ADAPTER_RANK},
    ),
    "joint_gradnorm": Case(TASKS, "ddp_find_unused_parameters_true", _joint("gradnorm", lr=0.1)),
    "joint_uncertainty": Case(TASKS, "ddp_find_unused_parameters_true", _joint("uncertainty")),
}


# ---------------------------------------------------------------------------- worker side
class _Probe(L.Callback):
    """Saves this rank's weights at the end of ``setup`` (after the MergeCallback's) and the
    sample indices its feature cache holds after the first epoch."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.first_epoch_keys: list[int] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            torch.save(_cpu_state(pl_module), self.out / f"setup_rank{trainer.global_rank}.pt")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cache = getattr(pl_module, "feature_source", None)
        if trainer.current_epoch == 0 and isinstance(cache, FeatureCache):
            self.first_epoch_keys = cache.cache.indices()


def _cpu_state(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _cache_report(module: SIMOModule, dm: SyntheticDataModule) -> dict[str, Any] | None:
    cache = module.feature_source
    if not isinstance(cache, FeatureCache):
        return None
    keys = cache.cache.indices()
    sample = dm.datasets["train"][keys[0]]
    with torch.no_grad():
        fresh = cache.encoder(sample["image"][None])
    stored = cache.cache.entry(keys[0])[: len(fresh.features)]
    error = max(float((a - b[0]).abs().max()) for a, b in zip(stored, fresh.features))
    return {
        "keys": keys,
        "hits": cache.hits,
        "misses": cache.misses,
        "size": len(cache),
        "max_feature_error": error,
    }


def run_case(name: str, root: Path, sources: dict[str, Any]) -> None:
    """Fit, validate and test one case on this rank, writing what the tests compare."""
    case = CASES[name]
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0, verbose=False)
    dm = _datamodule(case.tasks)
    module = case.module(sources["encoder"])
    callbacks: list[L.Callback] = []
    merge_cb = None
    if case.merge is not None:
        merge_cb = MergeCallback(checkpoints=sources["checkpoints"], **case.merge)
        callbacks.append(merge_cb)
    probe = _Probe(out)
    callbacks.append(probe)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD_SIZE,
        strategy=case.strategy,
        max_epochs=case.epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=out,
    )
    trainer.fit(module, datamodule=dm)
    rank = trainer.global_rank
    torch.save(_cpu_state(module), out / f"final_rank{rank}.pt")
    report: dict[str, Any] = {
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "alpha": None if merge_cb is None else merge_cb.alpha,
        "cache": _cache_report(module, dm),
        "first_epoch_keys": probe.first_epoch_keys,
        "fit_val": module.last_metrics["val"],
    }
    trainer.validate(module, datamodule=dm, verbose=False)
    report["val"] = module.last_metrics["val"]
    trainer.test(module, datamodule=dm, verbose=False)
    report["test"] = module.last_metrics["test"]
    (out / f"report_rank{rank}.json").write_text(json.dumps(report))


def _worker(argv: list[str]) -> None:
    root = Path(argv[0])
    sources = json.loads((root / "sources.json").read_text())
    for name in argv[1:]:
        try:
            run_case(name, root, sources)
        except BaseException:
            rank = os.environ.get("LOCAL_RANK", "?")
            (root / name).mkdir(parents=True, exist_ok=True)
            (root / name / f"error_rank{rank}.txt").write_text(traceback.format_exc())
            raise


# ---------------------------------------------------------------------------- test side
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _make_sources(root: Path) -> dict[str, Any]:
    """θ0 saved like a foundation checkpoint and one distinct 'fine-tuned' checkpoint per task."""
    torch.manual_seed(0)
    theta0 = Encoder(TINY_VIT).state_dict()
    foundation = root / "foundation.ckpt"
    torch.save({"state_dict": {"encoder." + k: v for k, v in theta0.items()}}, foundation)
    encoder = {**TINY_VIT, "checkpoint": str(foundation)}
    checkpoints = {}
    for i, task in enumerate(TASKS):
        torch.manual_seed(10 + i)
        module = _simo((task,))(encoder)
        with torch.no_grad():  # a distinct task vector per task
            for p in module.net.encoder.parameters():
                p.add_(0.02 * torch.randn_like(p))
        path = root / f"{task}.ckpt"
        torch.save({"state_dict": module.state_dict()}, path)
        checkpoints[task] = str(path)
    return {"encoder": encoder, "checkpoints": checkpoints}


@dataclass
class Run:
    """Where the workers wrote, and what they printed."""

    root: Path
    sources: dict[str, Any]
    returncodes: list[int]
    logs: list[str]

    def files(self, case: str, stem: str) -> list[Path]:
        paths = [self.root / case / f"{stem}_rank{r}" for r in range(WORLD_SIZE)]
        return [p.with_suffix(".json" if stem == "report" else ".pt") for p in paths]

    def require(self, case: str) -> None:
        missing = [p for p in self.files(case, "report") if not p.is_file()]
        if missing:
            errors = sorted((self.root / case).glob("error_rank*.txt"))
            detail = "\n".join(p.read_text() for p in errors) or "\n".join(
                log[-4000:] for log in self.logs
            )
            pytest.fail(
                f"DDP case {case!r} did not finish (exit codes {self.returncodes}):\n{detail}"
            )

    def reports(self, case: str) -> list[dict[str, Any]]:
        self.require(case)
        return [json.loads(p.read_text()) for p in self.files(case, "report")]

    def states(self, case: str, stem: str) -> list[dict[str, Tensor]]:
        self.require(case)
        return [torch.load(p, weights_only=True) for p in self.files(case, stem)]


def _launch(
    root: Path, cases: list[str], script: str = __file__, timeout: float = WORKER_TIMEOUT_S
) -> tuple[list[int], list[str]]:
    """Start ``script`` (a worker file) on every rank with ``cases``; exit codes and logs."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_"))
    }
    env.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
            "NODE_RANK": "0",
            "WORLD_SIZE": str(WORLD_SIZE),
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "PYTHONWARNINGS": "ignore",
        }
    )
    procs = []
    for rank in range(WORLD_SIZE):
        log = open(root / f"worker{rank}.log", "w")  # noqa: SIM115 - closed below
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, script, str(root), *cases],
                    env={**env, "LOCAL_RANK": str(rank)},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    codes = []
    for proc, log in procs:
        try:
            codes.append(proc.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            for other, _ in procs:
                other.kill()
            codes.append(-9)
        log.close()
    logs = [(root / f"worker{r}.log").read_text() for r in range(WORLD_SIZE)]
    return codes, logs


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("ddp")
    sources = _make_sources(root)
    (root / "sources.json").write_text(json.dumps(sources))
    codes, logs = _launch(root, list(CASES))
    return Run(root, sources, codes, logs)


def _assert_same_state(states: list[dict[str, Tensor]]) -> None:
    first, second = states
    assert first.keys() == second.keys()
    differing = [k for k in first if not torch.equal(first[k], second[k])]
    assert not differing, f"ranks differ in {differing[:5]}"


def _reference_module(run: Run, case: str) -> SIMOModule:
    """A fresh single-process module of ``case`` carrying rank 0's trained weights."""
    spec = CASES[case]
    module = spec.module(run.sources["encoder"])
    if spec.merge is not None:
        apply_realign_mode(module.net, spec.merge["realign"], spec.merge.get("adapter_rank", 16))
    module.load_state_dict(run.states(case, "final")[0])
    return module.eval()


def _assert_metrics_match_single_process(run: Run, case: str) -> None:
    reports = run.reports(case)
    assert reports[0]["val"] == reports[1]["val"]
    assert reports[0]["test"] == reports[1]["test"]
    # the last validation inside fit saw the final weights too, on every rank
    assert reports[0]["fit_val"] == pytest.approx(reports[0]["val"], rel=1e-6)
    module = _reference_module(run, case)
    dm = _datamodule(CASES[case].tasks)
    for split in ("val", "test"):
        expected = evaluate_net(module.net, dm.loader(split), module.task_specs)
        got = reports[0][split]
        assert got.keys() == expected.keys()
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), split
        if "segmentation/miou" in expected:
            assert 0.0 < got["segmentation/miou"] < 100.0  # percent


pytestmark = pytest.mark.slow


@pytest.mark.parametrize("case", list(CASES))
def test_ranks_start_and_end_with_identical_weights(run: Run, case: str) -> None:
    reports = run.reports(case)
    assert [r["world_size"] for r in reports] == [WORLD_SIZE, WORLD_SIZE]
    steps = CASES[case].epochs * SIZES["num_train"] // (WORLD_SIZE * SIZES["batch_size"])
    assert [r["global_step"] for r in reports] == [steps, steps]
    setup, final = run.states(case, "setup"), run.states(case, "final")
    _assert_same_state(setup)
    _assert_same_state(final)
    trained = [k for k in setup[0] if not torch.equal(setup[0][k], final[0][k])]
    assert any(".heads." in k for k in trained), "the heads did not train"


@pytest.mark.parametrize("case", list(CASES))
def test_synced_metrics_equal_a_single_process_evaluation(run: Run, case: str) -> None:
    _assert_metrics_match_single_process(run, case)


@pytest.mark.parametrize("case", ["merge_heads", "merge_adapters"])
def test_every_rank_builds_the_single_process_merge(run: Run, case: str) -> None:
    alpha = run.reports(case)[0]["alpha"]
    if CASES[case].merge["scaling"] == "search":
        assert alpha in SEARCH_GRID
    else:
        assert alpha == CASES[case].merge["scaling"]
    theta0 = encoder_state_dict(load_state_dict(run.sources["encoder"]["checkpoint"]))
    finetuned = [encoder_state_dict(load_state_dict(run.sources["checkpoints"][t])) for t in TASKS]
    expected = merge(theta0, finetuned, "task_arithmetic", scaling=alpha)
    setup, final = run.states(case, "setup"), run.states(case, "final")
    for key, value in expected.items():
        name = "net.encoder." + key
        assert torch.allclose(setup[0][name], value, atol=1e-6), key
        assert torch.equal(final[0][name], setup[0][name]), f"frozen {key} moved"


def test_adapters_are_the_only_encoder_weights_that_train(run: Run) -> None:
    setup, final = run.states("merge_adapters", "setup"), run.states("merge_adapters", "final")
    adapters = [k for k in setup[0] if k.startswith("net.encoder.adapters.")]
    assert len(adapters) == 2 * TINY_VIT["model_kwargs"]["depth"]  # down, up per block (lora)
    moved = [k for k in adapters if not torch.equal(setup[0][k], final[0][k])]
    assert moved == adapters


def test_each_rank_caches_the_samples_it_was_given(run: Run) -> None:
    reports = run.reports("merge_heads")
    caches = [r["cache"] for r in reports]
    per_rank = CASES["merge_heads"].epochs * SIZES["num_train"] // WORLD_SIZE
    for cache in caches:
        assert cache["misses"] == cache["size"] == len(cache["keys"])
        assert cache["hits"] + cache["misses"] == per_rank
        assert cache["max_feature_error"] < 1e-5
    # epoch 1: each rank cached exactly its own shard of the distributed sampler
    for rank, report in enumerate(reports):
        sampler = DistributedSampler(
            range(SIZES["num_train"]), num_replicas=WORLD_SIZE, rank=rank, shuffle=True, seed=0
        )
        assert report["first_epoch_keys"] == sorted(sampler)
    first = [set(r["first_epoch_keys"]) for r in reports]
    assert not first[0] & first[1]
    assert first[0] | first[1] == set(range(SIZES["num_train"]))
    # epoch 2 reshuffles the shards: each rank adds what it had not seen, recomputes nothing
    for cache, seen in zip(caches, first):
        assert seen <= set(cache["keys"])


def test_joint_strategies_stay_in_step(run: Run) -> None:
    gradnorm = run.states("joint_gradnorm", "final")
    weights = gradnorm[0]["weighting.task_weights"]
    assert not torch.allclose(weights, torch.ones_like(weights))  # GradNorm did update
    assert float(weights.sum()) == pytest.approx(len(TASKS), rel=1e-5)
    uncertainty = run.states("joint_uncertainty", "final")
    log_var = uncertainty[0]["weighting.log_var"]
    assert not torch.equal(log_var, torch.zeros_like(log_var))  # learnt, and equal on both ranks


def test_linear_probe_epoch_leaves_the_encoder_to_the_second_epoch(run: Run) -> None:
    setup, final = run.states("single_task", "setup"), run.states("single_task", "final")
    moved = [
        k
        for k in setup[0]
        if k.startswith("net.encoder.backbone.blocks") and not torch.equal(setup[0][k], final[0][k])
    ]
    assert moved  # fine-tuned in epoch 2 despite the detached first epoch


if __name__ == "__main__":
    _worker(sys.argv[1:])
