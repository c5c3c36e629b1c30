"""MergeCallback end to end on a tiny ViT: merged weights, α search, what trains, caching, resume.

Three single-task checkpoints fine-tuned briefly from one θ0 (made once per test session by
``tests/conftest.py``; θ0 is saved again here like a foundation checkpoint), so every test merges
real task vectors in seconds.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from conftest import (
    TINY_VIT,
    LossRecorder,
    SingleTasks,
    cli_overrides,
    cpu_trainer,
    tiny_datamodule,
    tiny_module,
)
from lightning.pytorch.loggers import Logger
from torch import Tensor

from lightning_simo.callbacks.merge import MergeCallback
from lightning_simo.callbacks.realign import FeatureCache
from lightning_simo.checkpoints import encoder_state_dict, head_state_dicts, load_state_dict
from lightning_simo.cli import main
from lightning_simo.data.synthetic import SyntheticDataModule
from lightning_simo.evaluation import delta_mtl, evaluate_net, mean_normalized_performance
from lightning_simo.merging import MERGE_METHODS, merge
from lightning_simo.models.encoders import Encoder
from lightning_simo.modules.simo import SIMOModule

TASKS = ("segmentation", "depth", "normals")
RESNET = {"name": "test_resnet", "indices": [0, 1, 2, 3], "class_token": False}


class _RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call in memory, so tests can read what was logged."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[dict[str, float], int | None]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.records.append((dict(metrics), step))

    def values(self, key: str) -> list[float]:
        return [float(m[key]) for m, _ in self.records if key in m]


def _datamodule(tasks: tuple[str, ...] = TASKS) -> SyntheticDataModule:
    return tiny_datamodule(tasks, augment=False, train_split="val")


def _trainer(root: Path, **kwargs: Any) -> L.Trainer:
    return cpu_trainer(root, **kwargs)


def _module(
    encoder: Mapping[str, Any], tasks: tuple[str, ...] = TASKS, **kwargs: Any
) -> SIMOModule:
    return tiny_module(tasks, encoder=dict(encoder), schedule="constant", **kwargs)


def _count(params: Any) -> int:
    return sum(p.numel() for p in params)


class Sources:
    """θ0, saved like a foundation checkpoint, and the session's fine-tuned single-task models
    (tests/conftest.py ``single_tasks``)."""

    def __init__(self, root: Path, single: SingleTasks) -> None:
        self.root = root
        self.theta0 = encoder_state_dict(load_state_dict(single.theta0))
        self.foundation = root / "foundation.ckpt"
        torch.save(
            {"state_dict": {"encoder." + k: v for k, v in self.theta0.items()}}, self.foundation
        )
        self.encoder = {**copy.deepcopy(TINY_VIT), "checkpoint": str(self.foundation)}
        self.paths: dict[str, str] = dict(single.checkpoints)
        self.finetuned = [encoder_state_dict(load_state_dict(self.paths[t])) for t in TASKS]
        self.heads = {t: head_state_dicts(load_state_dict(self.paths[t]))[t] for t in TASKS}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, single_tasks: SingleTasks) -> Sources:
    return Sources(tmp_path_factory.mktemp("merge_sources"), single_tasks)


def _merged(sources: Sources, tmp_path: Path, **options: Any) -> tuple[SIMOModule, MergeCallback]:
    """A merged module built by calling the callback's ``setup`` directly (no data needed)."""
    module = _module(sources.encoder)
    callback = MergeCallback(checkpoints=sources.paths, **options)
    callback.setup(_trainer(tmp_path), module, "fit")
    return module, callback


# ---------------------------------------------------------------------------- merged weights
@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("task_arithmetic", {}),
        ("ties", {"density": 0.3, "trim_scope": "global"}),
        ("average", {}),
        ("dare", {"drop_rate": 0.5, "seed": 3}),
    ],
)
def test_fixed_alpha_merge_equals_the_merge_function(
    sources: Sources, tmp_path: Path, method: str, options: dict[str, Any]
) -> None:
    alpha = 0.4
    module, callback = _merged(
        sources, tmp_path, method=method, scaling=alpha, method_options=options, realign="heads"
    )
    scaled = method != "average"
    expected = merge(
        sources.theta0,
        sources.finetuned,
        method,
        **({"scaling": alpha} if scaled else {}),
        **options,
    )
    got = module.net.encoder.state_dict()
    assert sorted(got) == sorted(expected)
    worst = max((got[k].float() - expected[k].float()).abs().max().item() for k in expected)
    assert worst <= 1e-6, f"largest difference to merge(): {worst:g}"
    moved = sum(
        (got[k] - sources.theta0[k]).abs().sum().item() for k in got if got[k].is_floating_point()
    )
    assert moved > 0  # the merge really changed θ0
    assert callback.alpha == (alpha if scaled else None)


def test_fine_tuned_heads_are_attached(sources: Sources, tmp_path: Path) -> None:
    module, _ = _merged(sources, tmp_path, scaling=0.5)
    for task in TASKS:
        own = module.net.heads[task].state_dict()
        assert sorted(own) == sorted(sources.heads[task])
        for key, value in sources.heads[task].items():
            assert torch.equal(own[key], value), (task, key)


# ---------------------------------------------------------------------------- α search
def test_alpha_search_keeps_the_best_alpha_and_logs_scores(
    sources: Sources, tmp_path: Path
) -> None:
    grid = (0.0, 0.5, 1.0)
    module = _module(sources.encoder)
    callback = MergeCallback(checkpoints=sources.paths, scaling="search", search_grid=grid)
    logger = _RecordingLogger()
    dm = _datamodule()
    trainer = _trainer(tmp_path, logger=logger, callbacks=[callback], limit_val_batches=1)
    trainer.validate(module, datamodule=dm)

    assert list(callback.search_scores) == list(grid)
    best = max(grid, key=lambda a: (callback.search_scores[a], -a))
    assert callback.alpha == best
    assert logger.values("merge/search_alpha") == list(grid)
    assert logger.values("merge/search_score") == pytest.approx(
        [callback.search_scores[a] for a in grid]
    )
    assert logger.values("merge/alpha") == [best]
    merged = merge(sources.theta0, sources.finetuned, "task_arithmetic", scaling=best)
    for key, value in module.net.encoder.state_dict().items():
        assert torch.allclose(value, merged[key], rtol=0, atol=1e-6), key

    # the α = 0 score is θ0 with the fine-tuned heads, against each single-task model
    net, specs, loader = module.net, module.task_specs, dm.loader("val")
    baseline: dict[str, float] = {}
    for task, weights in zip(TASKS, sources.finetuned, strict=True):
        net.encoder.load_state_dict(weights, strict=False)
        baseline.update(evaluate_net(net, loader, {task: specs[task]}))
    assert baseline == pytest.approx(callback.baseline)
    net.encoder.load_state_dict(sources.theta0, strict=False)
    at_zero = mean_normalized_performance(evaluate_net(net, loader, specs), baseline, specs)
    assert callback.search_scores[0.0] == pytest.approx(at_zero, rel=1e-5)


def test_the_search_metric_sets_the_score_and_the_cache_key(
    sources: Sources, tmp_path: Path
) -> None:
    grid = (0.0, 1.0)
    cache = tmp_path / "alpha_search.json"
    searched = {}
    for metric in ("ratio", "difference"):
        module, dm = _module(sources.encoder), _datamodule()
        callback = MergeCallback(
            checkpoints=sources.paths,
            search_grid=grid,
            search_metric=metric,
            search_cache=str(cache),
        )
        trainer = _trainer(tmp_path / metric, callbacks=[callback], limit_val_batches=1)
        trainer.validate(module, datamodule=dm)
        searched[metric] = callback
    # the second search evaluated its own grid: the criterion is part of the key
    entries = json.loads(cache.read_text())
    assert sorted(e["context"]["search_metric"] for e in entries.values()) == [
        "difference",
        "ratio",
    ]
    # α = 1 scored by hand against the same single-task baseline, in each form
    ratio, difference = searched["ratio"], searched["difference"]
    assert ratio.baseline == pytest.approx(difference.baseline)
    net, specs = module.net, module.task_specs
    net.encoder.load_state_dict(
        merge(sources.theta0, sources.finetuned, "task_arithmetic", scaling=1.0), strict=False
    )
    values = evaluate_net(net, dm.loader("val"), specs, max_batches=None)
    primary = {f"{t}/{s.primary}": s.higher_is_better for t, s in specs.items()}
    picked = {k: values[k] for k in primary}
    base = {k: difference.baseline[k] for k in primary}
    expected = 1 + delta_mtl(picked, base, primary, form="difference") / 100
    assert difference.search_scores[1.0] == pytest.approx(expected, rel=1e-5)
    assert ratio.search_scores[1.0] == pytest.approx(
        mean_normalized_performance(values, ratio.baseline, specs), rel=1e-5
    )


def test_an_unknown_search_metric_is_refused() -> None:
    with pytest.raises(ValueError, match="search_metric must be one of ratio, difference"):
        MergeCallback(checkpoints={"depth": "x.ckpt"}, search_metric="ratios")


def test_alpha_search_on_the_test_split_is_refused() -> None:
    with pytest.raises(ValueError, match="test split"):
        MergeCallback(checkpoints={"depth": "x.ckpt"}, search_split="test")


# ---------------------------------------------------------------------------- what trains
@pytest.mark.parametrize(
    ("mode", "form"),
    [
        ("none", "lora"),
        ("heads", "lora"),
        ("adapters", "lora"),
        ("adapters", "residual"),
        ("full", "lora"),
    ],
)
def test_only_the_chosen_mode_requires_grad(
    sources: Sources, tmp_path: Path, mode: str, form: str
) -> None:
    rank = 4
    module, _ = _merged(
        sources, tmp_path, scaling=0.5, realign=mode, adapter_rank=rank, adapter_form=form
    )
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    heads = _count(module.net.heads.parameters())
    dim, blocks = TINY_VIT["model_kwargs"]["embed_dim"], TINY_VIT["model_kwargs"]["depth"]
    per_block = 2 * rank * dim  # both forms: down and up projections, no biases
    expected = {
        "none": 0,
        "heads": heads,
        "adapters": heads + blocks * per_block,
        # everything but the final norm, which no head reads
        "full": _count(module.parameters()) - 2 * dim,
    }[mode]
    assert _count(trainable.values()) == expected == module.trainable_parameters()
    if mode == "heads":
        assert all(n.startswith("net.heads.") for n in trainable)
    if mode == "adapters":
        assert all(n.startswith(("net.heads.", "net.encoder.adapters.")) for n in trainable)
        assert _count(module.net.encoder.adapters.parameters()) == blocks * per_block


# ---------------------------------------------------------------------------- feature cache
def _head_realignment(sources: Sources, root: Path, cache: bool) -> tuple[list[float], SIMOModule]:
    L.seed_everything(0)
    module = _module(sources.encoder, head_lr=1e-2)
    recorder = LossRecorder()
    callback = MergeCallback(
        checkpoints=sources.paths, scaling=0.5, realign="heads", cache_features=cache
    )
    trainer = _trainer(root, max_epochs=2, limit_val_batches=0, callbacks=[callback, recorder])
    trainer.fit(module, datamodule=_datamodule())
    return [float(loss) for loss in recorder.losses], module


def test_cached_features_train_the_heads_like_the_encoder(sources: Sources, tmp_path: Path) -> None:
    cached, with_cache = _head_realignment(sources, tmp_path / "cache", cache=True)
    direct, without = _head_realignment(sources, tmp_path / "direct", cache=False)
    assert len(cached) == len(direct) == 2  # 8 val images, batch 8: one step per epoch
    assert cached == pytest.approx(direct, rel=1e-5, abs=1e-6)
    assert cached[1] != cached[0]  # the heads did train
    cache = with_cache.feature_source
    assert isinstance(cache, FeatureCache) and without.feature_source is None
    assert (cache.misses, cache.hits, len(cache)) == (8, 8, 8)
    for task in TASKS:
        for key, value in with_cache.net.heads[task].state_dict().items():
            assert torch.allclose(value, without.net.heads[task].state_dict()[key], atol=1e-5)


def test_feature_cache_serves_encoder_features_and_refuses_changed_images(
    sources: Sources,
) -> None:
    encoder = Encoder(sources.encoder).eval()
    cache = FeatureCache(encoder)
    images = torch.rand(4, 3, 32, 40)
    batch = {"image": images, "index": torch.arange(4)}
    first = cache(batch)
    again = cache({"image": images.clone(), "index": torch.arange(4)})
    with torch.no_grad():
        direct = encoder(images)
    assert first is not None and again is not None
    for got in (first, again):
        for a, b in zip(got.features, direct.features, strict=True):
            assert torch.allclose(a, b, atol=1e-6)
        assert got.class_tokens is not None and direct.class_tokens is not None
        for a, b in zip(got.class_tokens, direct.class_tokens, strict=True):
            assert torch.allclose(a, b, atol=1e-6)
    assert (cache.misses, cache.hits) == (4, 4)
    assert cache({"image": images}) is None  # no index: the module runs the encoder itself

    flipped = images.clone()
    flipped[2] = flipped[2].flip(-1)  # same pixel sum, other image
    with pytest.raises(ValueError, match=r"sample 2 .*augment: false.*cache_features: false"):
        cache({"image": flipped, "index": torch.arange(4)})
    cropped = torch.nn.functional.interpolate(images, size=(24, 40))
    with pytest.raises(ValueError, match="sample 0"):
        cache({"image": cropped, "index": torch.arange(4)})


# ---------------------------------------------------------------------------- errors
def test_checkpoint_without_the_head_of_its_task_is_refused(
    sources: Sources, tmp_path: Path
) -> None:
    paths = {**sources.paths, "depth": sources.paths["segmentation"]}
    module = _module(sources.encoder)
    callback = MergeCallback(checkpoints=paths, scaling=0.5)
    with pytest.raises(
        ValueError, match=r"for task 'depth' has no head .*heads found: segmentation"
    ):
        callback.setup(_trainer(tmp_path), module, "fit")


def test_encoder_of_another_width_names_the_key_and_both_shapes(
    sources: Sources, tmp_path: Path
) -> None:
    wide_kwargs = {**TINY_VIT["model_kwargs"], "embed_dim": 48}
    wide = _module({**TINY_VIT, "model_kwargs": wide_kwargs}, ("segmentation",))
    path = tmp_path / "wide.ckpt"
    torch.save({"state_dict": wide.state_dict()}, path)
    module = _module(sources.encoder)
    callback = MergeCallback(checkpoints={**sources.paths, "segmentation": str(path)}, scaling=0.5)
    with pytest.raises(ValueError, match=r"'backbone\.cls_token'.*\(1, 1, 32\).*\(1, 1, 48\)"):
        callback.setup(_trainer(tmp_path), module, "fit")


def test_a_task_without_checkpoint_is_refused(sources: Sources, tmp_path: Path) -> None:
    module = _module(sources.encoder)
    partial = {t: sources.paths[t] for t in ("segmentation", "depth")}
    with pytest.raises(ValueError, match=r"No checkpoint given for task\(s\) \['normals'\]"):
        MergeCallback(checkpoints=partial, scaling=0.5).setup(_trainer(tmp_path), module, "fit")
    with pytest.raises(ValueError, match="needs one checkpoint per task"):
        MergeCallback(scaling=0.5).setup(_trainer(tmp_path), module, "fit")


# ---------------------------------------------------------------------------- resume
class _HeadsAtStart(L.Callback):
    """The heads as the training loop first sees them (after any checkpoint restore)."""

    def __init__(self) -> None:
        self.heads: dict[str, dict[str, Tensor]] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.heads = {
            t: {k: v.detach().clone() for k, v in h.state_dict().items()}
            for t, h in pl_module.net.heads.items()
        }


@pytest.mark.slow
def test_resume_continues_from_the_realigned_weights(sources: Sources, tmp_path: Path) -> None:
    grid = (0.0, 1.0)

    def run(
        paths: Mapping[str, str], steps: int, ckpt: Path | None, scaling: float | str = "search"
    ) -> tuple[SIMOModule, MergeCallback, _HeadsAtStart, L.Trainer]:
        module = _module(sources.encoder, head_lr=1e-2)
        callback = MergeCallback(
            checkpoints=dict(paths), scaling=scaling, search_grid=grid, realign="heads"
        )
        probe = _HeadsAtStart()
        trainer = _trainer(
            tmp_path / "run", max_steps=steps, limit_val_batches=0, callbacks=[callback, probe]
        )
        trainer.fit(module, datamodule=_datamodule(), ckpt_path=ckpt)
        return module, callback, probe, trainer

    first, first_cb, _, trainer = run(sources.paths, 2, None)
    ckpt = tmp_path / "stopped.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = {
        t: {k: v.clone() for k, v in h.state_dict().items()} for t, h in first.net.heads.items()
    }

    second, second_cb, probe, trainer = run(sources.paths, 3, ckpt)
    assert trainer.global_step == 3  # one more step after the two restored ones
    assert second_cb.alpha == first_cb.alpha
    assert second_cb.search_scores == pytest.approx(first_cb.search_scores)
    for task in TASKS:
        for key, value in saved[task].items():
            assert torch.equal(probe.heads[task][key], value), (task, key)
        assert not torch.equal(probe.heads[task]["out.weight"], sources.heads[task]["out.weight"])
    for key, value in first.net.encoder.state_dict().items():
        assert torch.equal(second.net.encoder.state_dict()[key], value), key

    other = tmp_path / "depth_copy.ckpt"
    shutil.copyfile(sources.paths["depth"], other)
    state = torch.load(other, weights_only=True)
    state["state_dict"]["net.heads.depth.out.bias"] += 1.0
    torch.save(state, other)
    with pytest.raises(ValueError, match=r"merged with another 'sources'.*same merge config"):
        run({**sources.paths, "depth": str(other)}, 3, ckpt, scaling=1.0)  # α is not checked


# ---------------------------------------------------------------------------- BatchNorm statistics
def test_reestimated_bn_statistics_differ_from_the_pretrained_ones(tmp_path: Path) -> None:
    torch.manual_seed(0)
    encoder = Encoder(RESNET)
    theta0 = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    foundation = tmp_path / "foundation.ckpt"
    torch.save({"state_dict": {"encoder." + k: v for k, v in theta0.items()}}, foundation)
    config = {**RESNET, "checkpoint": str(foundation)}
    paths = {}
    for task in TASKS:
        single = _module(config, (task,))
        with torch.no_grad():  # weights and running statistics both move
            for value in single.net.encoder.state_dict().values():
                if value.is_floating_point():
                    value.add_(0.05 * torch.randn_like(value).abs_())
        paths[task] = str(tmp_path / f"{task}.ckpt")
        torch.save({"state_dict": single.state_dict()}, paths[task])

    def stats(policy: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        module = _module(config)
        callback = MergeCallback(
            checkpoints=paths, scaling=0.5, bn_stats=policy, reestimate_batches=2, realign="heads"
        )
        trainer = _trainer(tmp_path, callbacks=[callback], limit_val_batches=1)
        trainer.validate(module, datamodule=_datamodule())
        state = module.net.encoder.state_dict()
        running = {k: v for k, v in state.items() if "running_" in k or "num_batches" in k}
        weights = {k: v for k, v in state.items() if k not in running}
        return running, weights

    pretrained, weights_p = stats("pretrained")
    reestimated, weights_r = stats("reestimate")
    assert pretrained and sorted(pretrained) == sorted(reestimated)
    for key in weights_p:
        assert torch.equal(weights_p[key], weights_r[key]), key
    for key, value in pretrained.items():
        if "num_batches" in key:
            # re-estimated on the training split (val: 8 images), which is one batch of 8
            assert int(reestimated[key]) == 1, key
            continue
        assert torch.equal(value, theta0[key]), key
        assert not torch.allclose(reestimated[key], value), key


# ---------------------------------------------------------------------------- every method, CLI
@pytest.mark.slow
@pytest.mark.parametrize("method", MERGE_METHODS.names())
def test_every_method_fits_with_head_realignment_from_the_command_line(
    method: str, single_tasks: SingleTasks, tmp_path: Path
) -> None:
    """``fit --config configs/synthetic/merge.yaml --merge.method <each> --merge.realign heads``
    (data-based methods gather their statistics on the run's images)."""
    run = tmp_path / "run"
    config = cli_overrides(run, {"max_epochs": 1})
    encoder = config["model"]["init_args"]["encoder"]
    encoder["checkpoint"] = str(single_tasks.theta0)
    config["model"]["init_args"]["reference_metrics"] = single_tasks.references
    config["merge"] = {"checkpoints": single_tasks.checkpoints, "search_grid": [0.5, 1.0]}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    merge_yaml = Path(__file__).resolve().parents[1] / "configs" / "synthetic" / "merge.yaml"
    main(
        ["fit", "--config", str(merge_yaml), "--config", str(path)]
        + ["--merge.method", method, "--merge.realign", "heads"]
    )
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    merged = next(v for k, v in state["callbacks"].items() if k.startswith("MergeCallback"))
    assert merged["method"] == method and set(merged["paths"]) == set(single_tasks.checkpoints)
    assert state["global_step"] >= 1  # the heads trained
    theta0 = load_state_dict(single_tasks.theta0)
    moved = [
        k
        for k, v in theta0.items()
        if v.is_floating_point() and not torch.equal(state["state_dict"][k], v)
    ]
    assert moved, f"{method} left the encoder at θ0"
