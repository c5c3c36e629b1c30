"""SIGKILL-and-resume of the stateful MTL methods gives the uninterrupted run's weights bit for bit.

FAMO (logits, Adam moments, previous losses; an after-step update) and GradVac (cosine targets,
its own generator's state) keep their state in buffers; ``tests/test_resume.py``'s machinery kills
a fit at an epoch boundary, resumes it from ``last.ckpt`` and compares every tensor of the final
checkpoint, the strategy's buffers included. Nash-MTL needs the optional cvxpy (skipped without).
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from test_resume import TASKS, assert_same_run, kill_and_resume, tiny_config

pytestmark = pytest.mark.slow

STATEFUL = [
    ("famo", ["weighting.logits", "weighting.exp_avg_sq"]),
    ("gradvac", ["weighting.targets", "weighting.rng_state"]),
    pytest.param(
        "nash_mtl",
        ["weighting.prev_alpha", "weighting.steps"],
        marks=pytest.mark.skipif(find_spec("cvxpy") is None, reason="nash_mtl needs cvxpy"),
    ),
]


@pytest.mark.parametrize(("weighting", "state"), STATEFUL)
def test_resume_stateful_weighting(weighting: str, state: list[str], tmp_path: Path) -> None:
    config = tiny_config(tmp_path, TASKS, model={"weighting": weighting})
    # augmentation resumes exactly only in loader workers (see tests/test_resume.py)
    config["data"]["init_args"]["num_workers"] = 1
    reference, resumed, start = kill_and_resume(tmp_path, "mtl.yaml", config)
    assert_same_run(reference, resumed, start)
    for key in state:
        assert torch.equal(reference["state_dict"][key], resumed["state_dict"][key])
    assert not torch.equal(
        resumed["state_dict"][state[0]], torch.zeros_like(resumed["state_dict"][state[0]])
    )
