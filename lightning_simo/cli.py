"""The one command line: ``lightning_simo fit|validate|test|predict --config ...``.

A thin LightningCLI subclass. It links the datamodule's facts (task list, class counts) into the
model, expands ``{tasks}`` and ``{root}`` in output paths so one YAML serves every task, and turns the suite's
own input errors into one readable line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI

from lightning_simo.callbacks.guard import NonFiniteLossError
from lightning_simo.callbacks.merge import MergeCallback
from lightning_simo.checkpoints import CheckpointError
from lightning_simo.io import ensure_writable_dir

__all__ = ["SIMOCLI", "USER_ERRORS", "build_cli", "main"]

USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    PermissionError,
    CheckpointError,
    NonFiniteLossError,
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
        parser.link_arguments("data.tasks", "model.init_args.tasks", apply_on="instantiate")
        parser.link_arguments(
            "data.num_classes", "model.init_args.num_classes", apply_on="instantiate"
        )

    EVALUATION_ARGS = ("reference_metrics", "metrics_file")
    """Model arguments that only say how to report a test: the config given now wins over the
    hyper-parameters stored in a ``--ckpt_path`` checkpoint (Lightning applies those last)."""

    def _parse_ckpt_path(self) -> None:
        sub = self.config.get("subcommand")
        init_args = self.config[sub].get("model", {}).get("init_args") if sub else None
        given = {k: init_args.get(k) for k in self.EVALUATION_ARGS} if init_args else {}
        super()._parse_ckpt_path()
        if given:
            restored = self.config[sub]["model"]["init_args"]
            for key, value in given.items():
                if value is not None:
                    restored[key] = value

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        tasks = config.get("data", {}).get("init_args", {}).get("tasks")
        names = {"{tasks}": "+".join(tasks) if tasks else "all"}
        root = config["trainer"].get("default_root_dir")
        if isinstance(root, str):
            names["{root}"] = _expand(root, names)
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
        return self._instantiate_trainer(trainer_config, extra)


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
    "merge": (
        "lightning_simo.merge_cli",
        "merge checkpoints without training: lazily, tensor by tensor, into sharded safetensors",
    ),
    "prepare": (
        "lightning_simo.prepare_cli",
        "write a datamodule's splits as a streaming dataset (--format litdata)",
    ),
}
"""Commands beyond Lightning's fit/validate/test/predict, each a module with ``main(args)``."""


def _extra_commands_help() -> str:
    lines = ["More commands:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in EXTRA_COMMANDS.items()]
    lines.append("Run `lightning_simo <command> --help` for their options.")
    return "\n".join(lines)


def _run(args: list[str] | None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in EXTRA_COMMANDS:
        module = importlib.import_module(EXTRA_COMMANDS[argv[0]][0])
        module.main(argv[1:])
        return
    build_cli(args)


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


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning_simo`` console script (and ``python -m lightning_simo``)."""
    try:
        _run(args)
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None or os.environ.get("LIGHTNING_SIMO_DEBUG"):
            raise
        print(f"lightning_simo: error: {user_error}", file=sys.stderr)
        raise SystemExit(2) from None
