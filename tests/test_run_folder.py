"""Run-folder rules, fast: the lock, atomic writes under a full disk, signals, stage records."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_simo.checkpoint_io import AtomicCheckpointIO
from lightning_simo.checkpoints import read_checkpoint
from lightning_simo.interruption import (
    RunInterrupted,
    exit_status,
    interrupting_signal,
    sigterm_stops_between_runs,
)
from lightning_simo.io import (
    LOCK_FILE,
    OutputWriteError,
    RunFolderError,
    RunLock,
    atomic_write,
    atomic_write_text,
)
from lightning_simo.study import Stage, _Progress, _stage_commands


# ----------------------------------------------------------------------------- lock
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(folder: Path, pid: int, **extra: object) -> None:
    import socket

    record = {"pid": pid, "host": socket.gethostname(), "slurm_job_id": None, **extra}
    (folder / LOCK_FILE).write_text(json.dumps(record))


def test_lock_refuses_a_live_holder_and_names_it(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, holder.pid)
        with pytest.raises(RunFolderError) as info:
            RunLock(tmp_path).acquire()
        message = str(info.value)
        assert message.startswith(f"{tmp_path}: in use by another run (PID {holder.pid}")
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid  # untouched
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_is_taken_over_with_a_warning_and_released(tmp_path: Path) -> None:
    pid = _dead_pid()
    _write_lock(tmp_path, pid)
    with pytest.warns(UserWarning, match=f"taking over the lock of PID {pid}"):
        lock = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert RunLock(tmp_path).acquire()  # this process again (the study's stages): no conflict
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_lock_of_the_same_slurm_job_is_its_earlier_incarnation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, holder.pid, slurm_job_id="4242")
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        with pytest.warns(UserWarning, match="no longer runs"):
            RunLock(tmp_path).acquire().release()
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------- atomic writes
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EFBIG])
def test_failed_write_is_one_line_and_keeps_the_old_file(tmp_path: Path, code: int) -> None:
    path = atomic_write_text(tmp_path / "results.md", "old\n")

    def full(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(code, os.strerror(code))

    with pytest.raises(OutputWriteError) as info:
        atomic_write(path, full)
    assert str(info.value).startswith(f"{path}: could not be written ({os.strerror(code)})")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.md"]  # no temporary left


def test_checkpoint_io_under_a_file_size_limit_keeps_the_previous_checkpoint(
    tmp_path: Path,
) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    first = {"state_dict": {"w": torch.zeros(1000)}, "pytorch-lightning_version": "2"}
    io.save_checkpoint(first, path)
    before = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, hard))  # `ulimit -f`
    try:
        with pytest.raises(OutputWriteError, match="File too large"):
            io.save_checkpoint({**first, "state_dict": {"w": torch.ones(1000)}}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert path.read_bytes() == before
    assert torch.equal(read_checkpoint(path)["state_dict"]["w"], torch.zeros(1000))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# ----------------------------------------------------------------------------- signals
def test_signals_are_told_apart_from_errors() -> None:
    assert interrupting_signal(SIGTERMException()) == signal.SIGTERM
    assert interrupting_signal(KeyboardInterrupt()) == signal.SIGINT
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            sys.exit(1)  # what Lightning does after a graceful Ctrl+C
    except SystemExit as err:
        assert interrupting_signal(err) == signal.SIGINT
    assert interrupting_signal(SystemExit(2)) is None
    assert interrupting_signal(ValueError("x")) is None
    assert interrupting_signal(RunInterrupted(signal.SIGTERM, "m")) == signal.SIGTERM
    assert (exit_status(signal.SIGTERM), exit_status(signal.SIGINT)) == (143, 130)


def test_sigterm_between_runs_raises_and_the_handler_is_restored() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SIGTERMException), sigterm_stops_between_runs():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):
            pass
    assert signal.getsignal(signal.SIGTERM) is previous


# ----------------------------------------------------------------------------- study records
def _stage(tmp_path: Path) -> Stage:
    return Stage("single_task/depth", tmp_path, ["--config", "x.yaml"], ["--config", "x.yaml"])


def test_interrupted_stage_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    stage = _stage(tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    fresh = _stage_commands(stage, {}, force=False)
    assert fresh[0] == ("fit", ["--config", "x.yaml", "--overwrite=true"])
    assert fresh[1][0] == "test"
    # interrupted before its first checkpoint: starts over
    assert _stage_commands(stage, {"status": "interrupted"}, False)[0][1][-1] == "--overwrite=true"
    last.parent.mkdir()
    last.write_bytes(b"x")
    for status in ("interrupted", "running"):  # running: the study was killed (SIGKILL)
        resumed = _stage_commands(stage, {"status": status}, False)
        assert resumed[0] == ("fit", ["--config", "x.yaml", f"--ckpt_path={last}"])
    # a failed stage (e.g. a config error since fixed) and --force start over
    assert _stage_commands(stage, {"status": "failed"}, False)[0][1][-1] == "--overwrite=true"
    assert _stage_commands(stage, {"status": "interrupted"}, True)[0][1][-1] == "--overwrite=true"


def test_progress_lines_are_plain_with_elapsed_and_remaining(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = iter([0.0, 0.0, 60.0])  # created, first stage begins, second begins
    monkeypatch.setattr("lightning_simo.study.time.perf_counter", lambda: next(clock))
    lines: list[str] = []
    monkeypatch.setattr("lightning_simo.study.rank_zero_info", lines.append)
    progress = _Progress(total=5)
    label = progress.begin("foundation")
    progress.end(label, {"status": "done", "stopped_by": "max_epochs"}, 60.0)
    progress.begin("single_task/depth")
    assert lines[0] == (
        "[stage 1/5] foundation ... (elapsed 0s, remaining time known after the first stage)"
    )
    assert lines[1] == "[stage 1/5] foundation done in 1m00s, stopped by max_epochs"
    assert lines[2] == "[stage 2/5] single_task/depth ... (elapsed 1m00s, about 4m00s left)"
    assert all("\r" not in line for line in lines)


class _BadSample(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> torch.Tensor:
        raise ValueError("data/0.npy: corrupt array (re-extract the dataset)")


def test_an_error_in_a_dataloader_worker_is_reported_as_its_own_line(
    capsys: pytest.CaptureFixture,
) -> None:
    from lightning_simo.cli import report_user_error

    loader = torch.utils.data.DataLoader(_BadSample(), num_workers=1)
    with pytest.raises(ValueError) as info:
        next(iter(loader))
    assert "DataLoader worker process" in str(info.value)  # torch's wrapping, with a traceback
    assert report_user_error(info.value)
    err = capsys.readouterr().err
    assert err == ("lightning_simo: error: data/0.npy: corrupt array (re-extract the dataset)\n")
