"""The one command line: ``lightning_simo fit|validate|test|predict --config ...``.

A thin LightningCLI subclass. It links the datamodule's facts (task list, class counts) into the
model, expands ``{tasks}`` and ``{root}`` in output paths so one YAML serves every task, and turns the suite's
own input errors into one readable line and a non-zero exit.

It also keeps the run-folder rules (see docs/reliability.md): one live run per folder
(:class:`~lightning_simo.io.RunLock`), no second ``fit`` over an earlier run's checkpoints unless
asked (``--ckpt_path last`` resumes, ``--overwrite`` replaces), every ``--ckpt_path`` read by the
suite's safe loader before Lightning touches it, atomic checkpoint writes, and an interrupted run
(SIGTERM, SIGINT) reported as such with exit status 128 + the signal number.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_simo.callbacks.guard import NonFiniteLossError
from lightning_simo.callbacks.merge import MergeCallback
from lightning_simo.callbacks.resume import InterruptionCheckpoint, received_signal
from lightning_simo.callbacks.visualize import ImageLogger
from lightning_simo.checkpoint_io import AtomicCheckpointIO
from lightning_simo.checkpoints import (
    CheckpointError,
    head_state_dicts,
    read_checkpoint,
)
from lightning_simo.interruption import (
    RunInterrupted,
    exit_status,
    interrupting_signal,
    signal_name,
    stopping_rule,
)
from lightning_simo.io import OutputWriteError, RunFolderError, RunLock, ensure_writable_dir

__all__ = ["SIMOCLI", "USER_ERRORS", "build_cli", "main", "report_user_error", "run"]

USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    PermissionError,
    CheckpointError,
    NonFiniteLossError,
    MisconfigurationException,
    OutputWriteError,
)
"""Errors caused by the user's input (a NaN loss included: data or settings): reported as one line
(set LIGHTNING_SIMO_DEBUG=1 for a traceback)."""

PLACEHOLDERS = ("{tasks}", "{root}")
"""``{tasks}``: the datamodule's task list joined by ``+``; ``{root}``: ``trainer.default_root_dir``
(so logger and checkpoint folders follow a ``--trainer.default_root_dir`` override)."""


def _expand(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, str):
        for key, replacement in names.items():
            value = value.replace(key, replacement)
        return value
    if isinstance(value, Namespace):
        for key in list(vars(value)):
            setattr(value, key, _expand(getattr(value, key), names))
        return value
    if isinstance(value, dict):
        return {k: _expand(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, names) for v in value]
    return value


def _mentions(value: Any, key: str) -> bool:
    if isinstance(value, str):
        return key in value
    if isinstance(value, Namespace):
        value = vars(value)
    if isinstance(value, dict):
        return any(_mentions(v, key) for v in value.values())
    if isinstance(value, list):
        return any(_mentions(v, key) for v in value)
    return False


def _set_key(args: Any, key: str, value: Any) -> None:
    if isinstance(args, dict):
        args[key] = value
    else:
        setattr(args, key, value)


RESUME_KEYWORDS = ("last", "hpc", "best", "registry")
"""``--ckpt_path`` values Lightning resolves itself (checked once resolved)."""


def _is_active(callback: Any) -> bool:
    """A ``merge:`` section without checkpoints means "no merging" (single-task, MTL configs)."""
    if callback is None:
        return False
    return not isinstance(callback, MergeCallback) or bool(callback.checkpoints)


class SIMOCLI(LightningCLI):
    """LightningCLI with the datamodule -> model links every config relies on."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        # `merge:` in a config (or --merge.* flags) adds the MergeCallback; absent, nothing merges
        parser.add_lightning_class_args(MergeCallback, "merge", required=False)
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="fit: replace the checkpoints of an earlier run in the run folder (without it, "
            "a run folder holding checkpoints is refused; --ckpt_path last resumes it instead)",
        )
        parser.add_argument(
            "--log_images",
            type=bool,
            default=True,
            help="false: drop the config's ImageLogger (prediction panels take a few hundred "
            "milliseconds per task and epoch; studies turn them off)",
        )
        parser.link_arguments("data.tasks", "model.init_args.tasks", apply_on="instantiate")
        parser.link_arguments(
            "data.num_classes", "model.init_args.num_classes", apply_on="instantiate"
        )

    EVALUATION_ARGS = ("reference_metrics", "metrics_file")
    """Model arguments that only say how to report a test: the config given now wins over the
    hyper-parameters stored in a ``--ckpt_path`` checkpoint (Lightning applies those last)."""

    def _parse_ckpt_path(self) -> None:
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path and ckpt_path not in RESUME_KEYWORDS:
            # read as data, with a one-line diagnosis, before Lightning reads its hparams
            self._checkpoint_shapes(str(ckpt_path))
        init_args = self.config[sub].get("model", {}).get("init_args") if sub else None
        given = {k: init_args.get(k) for k in self.EVALUATION_ARGS} if init_args else {}
        super()._parse_ckpt_path()
        if not ckpt_path or not self.config[sub].get("model", {}).get("init_args"):
            return
        restored = self.config[sub]["model"]["init_args"]
        for key, value in given.items():
            if value is not None:
                restored[key] = value
        if sub == "fit":
            return  # a resumed fit rebuilds its run as it started (merge sources, θ0), then restores
        # the checkpoint holds the encoder and heads: never load (or download) them again, so it
        # can be tested or used from any folder and machine
        if restored.get("init_from") is not None:
            restored["init_from"] = None
        encoder = restored.get("encoder")
        if encoder is not None:
            _set_key(encoder, "checkpoint", None)
            _set_key(encoder, "pretrained", False)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        tasks = config.get("data", {}).get("init_args", {}).get("tasks")
        names = {"{tasks}": "+".join(tasks) if tasks else "all"}
        root = config["trainer"].get("default_root_dir")
        if isinstance(root, str):
            names["{root}"] = _expand(root, names)
        elif any(_mentions(config.get(k), "{root}") for k in ("trainer", "merge", "model")):
            raise ValueError(
                "trainer.default_root_dir is null, but the config's output paths use {root} "
                "(give the run folder with --trainer.default_root_dir DIR)"
            )
        for section in ("trainer", "merge"):
            if config.get(section) is not None:
                config[section] = _expand(config[section], names)
        model_args = config.get("model", {}).get("init_args")
        if model_args is not None:
            config["model"]["init_args"] = _expand(model_args, names)

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        if not self.subcommand or not self.config[self.subcommand].get("ckpt_path"):
            return
        for callback in self.trainer.callbacks:
            if isinstance(callback, MergeCallback):
                callback.restoring = True

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        root = self._get(self.config_init, "trainer", default={}).get("default_root_dir")
        if isinstance(root, str):
            ensure_writable_dir(root)  # one clear error now, not an OSError from a callback later
        keys = self._parser(self.subcommand).callback_keys
        extra = [cb for k in keys if _is_active(cb := self._get(self.config_init, k))]
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        plugins = trainer_config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(hasattr(p, "save_checkpoint") for p in plugins):
            trainer_config["plugins"] = [*plugins, AtomicCheckpointIO()]
        callbacks = trainer_config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        if not any(isinstance(c, InterruptionCheckpoint) for c in callbacks):
            extra = [*extra, InterruptionCheckpoint()]  # a stopped fit saves where it stopped
        if trainer_config.get("enable_progress_bar") is False:  # the override wins over configs
            callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
        if self._get(self.config_init, "log_images", default=True) is False:
            callbacks = [c for c in callbacks if not isinstance(c, ImageLogger)]
        trainer_config["callbacks"] = callbacks
        return self._instantiate_trainer(trainer_config, extra)

    # ------------------------------------------------------------------ run-folder rules
    LOCKED_SUBCOMMANDS = ("fit", "test")
    """Subcommands that write into the run folder (checkpoints, logs, test_metrics.json)."""

    stopping_rule: str | None = None
    """After ``fit``: the rule that ended it (``max_epochs``, ``early_stopping``...)."""

    def _run_subcommand(self, subcommand: str) -> None:
        trainer = self.trainer
        root = Path(trainer.default_root_dir)
        lock = RunLock(root)
        if subcommand in self.LOCKED_SUBCOMMANDS and rank_zero_only.rank == 0:
            lock.acquire()
        fresh_log_dirs = [d for d in self._log_dirs() if not d.exists()]
        try:
            self._check_checkpoint(subcommand)
            self._check_before_run(subcommand)
            super()._run_subcommand(subcommand)
            if subcommand == "fit":
                self.stopping_rule = stopping_rule(trainer)
        except BaseException as err:
            signum = interrupting_signal(err)
            if signum is not None:
                signum = received_signal(trainer) or signum  # a Ctrl+C stops as SIGTERM does
                raise RunInterrupted(signum, self._interrupted(subcommand, signum)) from None
            if trainer.global_step == 0:  # failed before training: no empty logger folders
                for folder in fresh_log_dirs:
                    _remove_tree(folder)
            raise
        finally:
            lock.release()

    def _log_dirs(self) -> list[Path]:
        folders = []
        for logger in self.trainer.loggers:
            log_dir = getattr(logger, "log_dir", None)
            if isinstance(log_dir, str):
                folders.append(Path(log_dir))
        return folders

    def _checkpoint_dirs(self) -> list[tuple[ModelCheckpoint, Path]]:
        return [
            (cb, Path(cb.dirpath))
            for cb in self.trainer.checkpoint_callbacks
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is not None
        ]

    def _check_checkpoint(self, subcommand: str) -> None:
        """Resolve ``last`` / ``hpc``, refuse a second fit over an earlier run, check the file."""
        config = self.config_init[subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":
            ckpt_path = self._last_checkpoint()
        elif ckpt_path == "hpc":
            ckpt_path = self.trainer._checkpoint_connector._hpc_resume_path
            if ckpt_path is None:
                raise RunFolderError(
                    f"{self.trainer.default_root_dir}: no hpc_ckpt_*.ckpt to resume (drop "
                    "--ckpt_path hpc to start the run)"
                )
        if subcommand == "fit" and ckpt_path is None:
            self._clear_or_refuse_earlier_run(bool(config.get("overwrite")))
        if ckpt_path is None or ckpt_path in RESUME_KEYWORDS:
            return
        config["ckpt_path"] = str(ckpt_path)
        shapes = self._checkpoint_shapes(str(ckpt_path))
        heads = sorted(head_state_dicts(shapes))
        tasks = list(getattr(self.model, "task_specs", {}) or [])
        missing = [t for t in tasks if t not in heads]
        if heads and missing:
            raise CheckpointError(
                f"{ckpt_path}: has no head for {', '.join(missing)} (it holds heads for "
                f"{', '.join(heads)}; use --data.tasks '[{','.join(heads)}]' or the checkpoint "
                f"trained for {', '.join(missing)})"
            )
        own = self.model.state_dict()
        for key, shape in shapes.items():
            if key in own and tuple(own[key].shape) != shape:
                raise CheckpointError(
                    f"{ckpt_path}: made with another encoder or class count ({key} has shape "
                    f"{list(shape)}, this model {list(own[key].shape)}) (use the config and "
                    "--data.tasks the checkpoint was trained with)"
                )

    def _checkpoint_shapes(self, path: str) -> dict[str, tuple[int, ...]]:
        """Tensor shapes of ``path``'s state dict, read once through the safe loader."""
        cache: dict[str, dict[str, tuple[int, ...]]] = self.__dict__.setdefault("_shapes", {})
        if path not in cache:
            state = read_checkpoint(path)["state_dict"]
            cache[path] = {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}
        return cache[path]

    def _last_checkpoint(self) -> Path:
        candidates = [
            d / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
            for cb, d in self._checkpoint_dirs()
            if cb.save_last
        ]
        for path in candidates:
            if path.is_file():
                return path
        where = candidates[0].parent if candidates else Path(self.trainer.default_root_dir)
        raise RunFolderError(
            f"{where}: no last.ckpt to resume (start the run without --ckpt_path last, or give "
            "the checkpoint's path)"
        )

    def _clear_or_refuse_earlier_run(self, overwrite: bool) -> None:
        root = Path(self.trainer.default_root_dir)
        earlier = sorted(root.glob("hpc_ckpt_*.ckpt"))
        for _, folder in self._checkpoint_dirs():
            earlier += sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
        if not earlier:
            return
        if not overwrite:
            names = ", ".join(p.name for p in earlier[:4]) + (" ..." if len(earlier) > 4 else "")
            raise RunFolderError(
                f"{earlier[0].parent}: holds checkpoints of an earlier run ({names}) (resume it "
                "with --ckpt_path last, or replace it with --overwrite)"
            )
        if rank_zero_only.rank == 0:
            for path in [*earlier, root / "test_metrics.json"]:
                path.unlink(missing_ok=True)

    def _check_before_run(self, subcommand: str) -> None:
        """Inputs that can be checked now rather than after an epoch of work."""
        hparams = getattr(self.model, "hparams", {})
        probe = int(hparams.get("probe_epochs", 0) or 0)
        max_epochs = self.trainer.max_epochs
        if (
            subcommand == "fit"
            and probe > 0
            and not hparams.get("freeze_encoder")
            and self.trainer.max_steps in (-1, None)
            and max_epochs not in (-1, None)
            and probe >= max_epochs
        ):
            raise ValueError(
                f"model.probe_epochs={probe} >= trainer.max_epochs={max_epochs}: the encoder "
                "would never be fine-tuned (set --model.probe_epochs below --trainer.max_epochs, "
                "or --model.freeze_encoder true for a linear probe)"
            )
        for callback in self.trainer.callbacks:
            if isinstance(callback, MergeCallback) and callback.checkpoints:
                from lightning_simo.merging import MERGE_METHODS

                if callback.method not in MERGE_METHODS:
                    raise ValueError(
                        f"merge.method {callback.method!r} is not a merging method (choose one "
                        f"of: {', '.join(sorted(MERGE_METHODS))})"
                    )
        if subcommand == "test" and hparams.get("reference_metrics"):
            from lightning_simo.modules.simo import load_reference_metrics

            load_reference_metrics(hparams["reference_metrics"])  # now, not after the test epoch

    def _interrupted(self, subcommand: str, signum: int) -> str:
        root = self.trainer.default_root_dir
        step = self.trainer.global_step
        if subcommand != "fit":
            how = "rerun the same command"
        elif any((d / "last.ckpt").is_file() for _, d in self._checkpoint_dirs()):
            how = "resume: the same command with --ckpt_path last"
        else:
            how = "no checkpoint was saved yet: rerun the same command"
        return f"{root}: {subcommand} stopped by {signal_name(signum)} at step {step} ({how})"


def _remove_tree(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    parent = folder.parent
    if parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()


EXTRA_COMMANDS: dict[str, tuple[str, str]] = {
    "study": (
        "lightning_simo.study",
        "run the whole comparison (pretrain, fine-tune, merge, "
        "re-align, joint MTL, test) and write a results table",
    ),
    "analyze": (
        "lightning_simo.analysis",
        "task relationships: λ sweeps per task vector, cosine "
        "similarities and norms of the task vectors",
    ),
    "export": (
        "lightning_simo.export",
        "a checkpoint -> model.safetensors + config.json + model card (Hugging Face layout)",
    ),
    "prepare": (
        "lightning_simo.prepare",
        "convert NYUv2 / Cityscapes downloads into the layout the loaders read, or a "
        "datamodule's splits into a streaming dataset (--format litdata)",
    ),
    "merge": (
        "lightning_simo.merge_cli",
        "merge checkpoints without training: lazily, tensor by tensor, into sharded safetensors",
    ),
}
"""Commands beyond Lightning's fit/validate/test/predict, each a module with ``main(args)``."""


def _extra_commands_help() -> str:
    lines = ["More commands:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in EXTRA_COMMANDS.items()]
    lines.append("Run `lightning_simo <command> --help` for their options.")
    return "\n".join(lines)


def run(args: list[str] | None) -> SIMOCLI | None:
    """Run one command; errors and interruptions propagate (:func:`main` reports them)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in EXTRA_COMMANDS:
        module = importlib.import_module(EXTRA_COMMANDS[argv[0]][0])
        module.main(argv[1:])
        return None
    return build_cli(args)


def build_cli(args: list[str] | None, run: bool = True) -> SIMOCLI:
    """The ``lightning_simo`` CLI on ``args``; ``run=False`` only builds model, data and trainer.

    One place for the CLI's settings, so commands that need the objects a config describes
    without fitting anything (``analyze``, notebooks) build them exactly as ``fit`` would.
    Explicit ``args`` (the study's stages, tests) hide the process's own command line from
    LightningCLI, which would otherwise warn about both being given.
    """
    argv = sys.argv
    if args is not None:
        sys.argv = argv[:1]
    try:
        return SIMOCLI(
            save_config_kwargs={"overwrite": True},
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            auto_configure_optimizers=False,
            parser_kwargs={
                "epilog": _extra_commands_help(),
                "formatter_class": argparse.RawDescriptionHelpFormatter,
            },
        )
    finally:
        sys.argv = argv


def _raised_by_parser(err: BaseException) -> bool:
    """Whether ``err`` was raised inside jsonargparse (which wraps errors of the classes it
    instantiates in a ValueError listing every type of a ``Union`` it tried)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith("jsonargparse")


def _user_error(err: BaseException) -> BaseException | None:
    """The user error to report for ``err``, looking through jsonargparse's wrappers to the
    error our code raised; ``None`` when it is not a user error (then the traceback matters)."""
    while _raised_by_parser(err) and err.__cause__ is not None:
        err = err.__cause__
    return err if isinstance(err, USER_ERRORS) else None


_WORKER_MARK = "in DataLoader worker process"


def _message(err: BaseException) -> str:
    """The error's own message; for one re-raised from a DataLoader worker (torch wraps it in the
    worker's traceback), the original message only."""
    text = str(err)
    if _WORKER_MARK in text.split("\n", 1)[0]:
        mark = f"\n{type(err).__name__}: "
        if mark in text:
            text = text[text.rindex(mark) + len(mark) :]
    return text.strip()


def report_user_error(err: BaseException) -> bool:
    """Print ``err`` as the one ``lightning_simo: error:`` line when it is a user error."""
    user_error = _user_error(err)
    if user_error is None or os.environ.get("LIGHTNING_SIMO_DEBUG"):
        return False
    print(f"lightning_simo: error: {_message(user_error)}", file=sys.stderr)
    return True


def report_interruption(err: BaseException) -> int | None:
    """Print the interruption line for ``err`` and return the exit status, if a signal caused it."""
    signum = interrupting_signal(err)
    if signum is None:
        return None
    detail = str(err) if isinstance(err, RunInterrupted) else f"stopped by {signal_name(signum)}"
    print(f"lightning_simo: interrupted: {detail}", file=sys.stderr)
    return exit_status(signum)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning_simo`` console script (and ``python -m lightning_simo``)."""
    try:
        run(args)
    except (SystemExit, KeyboardInterrupt, RunInterrupted) as err:
        status = report_interruption(err)
        if status is None:
            raise
        raise SystemExit(status) from None
    except Exception as err:
        if not report_user_error(err):
            raise
        raise SystemExit(2) from None
