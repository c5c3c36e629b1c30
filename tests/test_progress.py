"""Progress off a terminal: plain lines with the loop, the batch count and the time left."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_simo.callbacks.progress import ProgressBar


def test_progress_lines_when_output_is_not_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bar = ProgressBar(lines_per_loop=2)
    assert bar.lines  # pytest's captured stdout is not a terminal
    trainer = L.Trainer(
        max_epochs=2,
        limit_train_batches=4,
        limit_val_batches=2,
        limit_test_batches=2,
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    model = BoringModel()
    trainer.fit(model)
    trainer.test(model, verbose=False)
    out = capsys.readouterr().out
    fit = re.findall(r"\[fit\] epoch (\d)/2 batch (\d)/4 \(\d+%\) \d+s elapsed, ~\d+s left", out)
    assert fit == [("1", "2"), ("1", "4"), ("2", "2"), ("2", "4")]
    assert len(re.findall(r"\[validate\] batch \d/2", out)) == 4  # 2 lines x 2 epochs
    assert re.findall(r"\[test\] batch (\d)/2", out) == ["1", "2"]
    assert "\r" not in out  # no bar redraws in a log file
