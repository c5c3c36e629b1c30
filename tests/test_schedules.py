import pytest
import torch

from lightning_simo.modules.schedules import MIN_ONE_CYCLE_STEPS, one_cycle


@pytest.mark.parametrize("total", range(1, 41))
def test_one_cycle_runs_for_every_length_and_peaks_at_the_group_lr(total):
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.AdamW(
        [{"params": [params[0]], "lr": 1e-3}, {"params": [params[1]], "lr": 1e-2}]
    )
    sched = one_cycle(opt, total, warmup_fraction=0.05)["scheduler"]
    seen = []
    for _ in range(total):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    peak = [max(s[i] for s in seen) for i in range(2)]
    assert peak == pytest.approx([1e-3, 1e-2], rel=1e-6)
    if total >= MIN_ONE_CYCLE_STEPS:
        assert seen[0][0] < 1e-3 and seen[-1][0] < 1e-3  # warm-up and decay exist
