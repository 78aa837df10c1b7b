"""common/optim.py: optimizers and the per-step learning-rate schedule."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from common.errors import UserError
from common.optim import Schedule, build_optimizer

LR = 0.1


def make_opt(lr: float = LR, groups: int = 1) -> torch.optim.Optimizer:
    if groups == 1:
        return torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=lr)
    params = [{"params": [nn.Parameter(torch.zeros(1))], "lr": lr * (i + 1)} for i in range(groups)]
    return torch.optim.SGD(params, lr=lr)


def lrs_per_step(schedule: Schedule, steps: int) -> list[float]:
    """The lr in force for each optimizer step 0..steps-1."""
    out = []
    for _ in range(steps):
        out.append(schedule.lr)
        schedule.step()
    return out


# ---------------------------------------------------------------- optimizers

def test_build_optimizer_kinds():
    model = nn.Linear(3, 2)
    adamw = build_optimizer(model.parameters(), "adamw", 0.01, 0.05, amsgrad=True)
    assert type(adamw) is torch.optim.AdamW
    assert adamw.defaults["lr"] == 0.01 and adamw.defaults["weight_decay"] == 0.05
    assert adamw.defaults["amsgrad"] is True
    adam = build_optimizer(model.parameters(), "adam", 0.02, 0.0)
    assert type(adam) is torch.optim.Adam and adam.defaults["amsgrad"] is False
    sgd = build_optimizer(model.parameters(), "sgd", 0.03, 1e-4, momentum=0.8)
    assert type(sgd) is torch.optim.SGD
    assert sgd.defaults["momentum"] == 0.8 and sgd.defaults["nesterov"] is True
    plain = build_optimizer(model.parameters(), "sgd", 0.03, 0.0, momentum=0.0)
    assert plain.defaults["nesterov"] is False


def test_build_optimizer_skips_frozen_parameters():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = build_optimizer(model.parameters(), "adamw", 0.01, 0.0)
    params = opt.param_groups[0]["params"]
    assert len(params) == 2
    assert all(p.requires_grad for p in params)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_fused_optimizer_steps_like_the_plain_one(name):
    torch.manual_seed(0)
    a = nn.Linear(3, 2)
    b = nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    plain = build_optimizer(a.parameters(), name, 0.1, 0.01)
    fused = build_optimizer(b.parameters(), name, 0.1, 0.01, fused=True)
    assert fused.defaults["fused"] is True and not plain.defaults.get("fused")
    x = torch.randn(4, 3)
    for model, opt in ((a, plain), (b, fused)):
        for _ in range(2):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    assert torch.allclose(a.weight, b.weight, atol=1e-6)


@pytest.mark.parametrize("lr", [0.0, -0.1])
def test_build_optimizer_rejects_non_positive_lr(lr):
    with pytest.raises(UserError, match="--lr must be positive"):
        build_optimizer(nn.Linear(2, 2).parameters(), "adamw", lr, 0.0)


def test_build_optimizer_unknown_name():
    with pytest.raises(UserError, match="'lion'"):
        build_optimizer(nn.Linear(2, 2).parameters(), "lion", 0.1, 0.0)


def test_unknown_schedule_kind():
    with pytest.raises(UserError) as info:
        Schedule(make_opt(), "linear", epochs=3, steps_per_epoch=2)
    assert "'linear'" in str(info.value) and "cosine" in str(info.value)


# ---------------------------------------------------------------- schedule shapes

def test_none_keeps_lr():
    s = Schedule(make_opt(), "none", epochs=3, steps_per_epoch=4)
    assert lrs_per_step(s, 12) == [LR] * 12


def test_cosine_from_lr_to_min_lr_like_the_closed_form():
    epochs, spe, min_lr = 4, 5, 0.001
    s = Schedule(make_opt(), "cosine", epochs=epochs, steps_per_epoch=spe, min_lr=min_lr)
    got = lrs_per_step(s, epochs * spe + 1)
    assert got[0] == pytest.approx(LR)
    assert got[-1] == pytest.approx(min_lr)
    for step, lr in enumerate(got):
        t = step / spe
        expected = min_lr + (LR - min_lr) * 0.5 * (1 + math.cos(math.pi * t / epochs))
        assert lr == pytest.approx(expected, rel=1e-9)
    assert all(a >= b for a, b in zip(got, got[1:], strict=False))
    s.step()  # past the end it stays at the floor
    assert s.lr == pytest.approx(min_lr)


def test_warmup_starts_at_one_percent_and_reaches_full_lr():
    s = Schedule(make_opt(), "cosine", epochs=10, steps_per_epoch=4, warmup_epochs=2)
    got = lrs_per_step(s, 9)
    assert got[0] == pytest.approx(0.01 * LR)
    assert got[4] == pytest.approx((0.01 + 0.99 * 0.5) * LR)  # halfway through the warm-up
    assert got[8] == pytest.approx(LR)  # after 2 epochs = 8 steps: full lr, cosine starts
    assert all(a < b for a, b in zip(got[:9], got[1:9], strict=False))
    s.step()
    assert s.lr < LR


def test_warmup_in_front_of_constant_schedule():
    s = Schedule(make_opt(), "none", epochs=5, steps_per_epoch=2, warmup_epochs=1)
    assert lrs_per_step(s, 4) == pytest.approx([0.01 * LR, 0.505 * LR, LR, LR])


def test_step_decays_by_gamma_every_step_size_epochs():
    spe = 3
    s = Schedule(make_opt(), "step", epochs=9, steps_per_epoch=spe, step_size=2, gamma=0.5)
    got = lrs_per_step(s, 9 * spe)
    per_epoch = [got[e * spe] for e in range(9)]
    expected = [LR * 0.5 ** (e // 2) for e in range(9)]
    assert per_epoch == pytest.approx(expected)
    # constant inside an epoch
    assert got[2 * spe: 3 * spe] == pytest.approx([LR * 0.5] * spe)


def test_step_matches_torch_steplr():
    spe, epochs = 2, 7
    ours = Schedule(make_opt(), "step", epochs=epochs, steps_per_epoch=spe, step_size=3, gamma=0.1)
    got = lrs_per_step(ours, epochs * spe)
    opt = make_opt()
    ref = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.1)
    for epoch in range(epochs):
        assert got[epoch * spe] == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()


def test_warmrestart_restarts_at_t0_and_t0_plus_t0_times_mult():
    t0, mult, spe = 2, 2, 4
    s = Schedule(make_opt(), "warmrestart", epochs=20, steps_per_epoch=spe, t0=t0, t_mult=mult)
    got = lrs_per_step(s, 15 * spe)
    first_restart, second_restart, third_restart = t0 * spe, (t0 + t0 * mult) * spe, 14 * spe
    for restart in (first_restart, second_restart):
        assert got[restart] == pytest.approx(LR)
        assert got[restart - 1] < 0.1 * LR  # end of the previous cycle: near the floor
    assert got[third_restart - 1] < 0.1 * LR
    assert got[1] < LR and got[first_restart + 1] < LR
    # halfway through the second cycle (4 epochs long) the cosine is at its middle
    assert got[first_restart + 2 * spe] == pytest.approx(0.5 * LR)
    # lr only rises at the restarts
    rises = [i for i in range(1, len(got)) if got[i] > got[i - 1] + 1e-12]
    assert rises == [first_restart, second_restart, third_restart]


def test_onecycle_peaks_at_max_lr():
    epochs, spe = 10, 10
    s = Schedule(make_opt(), "onecycle", epochs=epochs, steps_per_epoch=spe)
    got = lrs_per_step(s, epochs * spe + 1)
    peak = max(range(len(got)), key=got.__getitem__)
    assert peak == int(0.3 * epochs * spe)
    assert got[peak] == pytest.approx(LR)
    assert got[0] == pytest.approx(LR / 25)
    assert got[-1] == pytest.approx(LR / (25 * 1e4))
    assert max(got) <= LR * (1 + 1e-12)


def test_onecycle_peak_follows_warmup():
    s = Schedule(make_opt(), "onecycle", epochs=10, steps_per_epoch=1, warmup_epochs=2)
    got = lrs_per_step(s, 11)
    assert max(range(11), key=got.__getitem__) == 2
    assert got[2] == pytest.approx(LR)


def test_plateau_reduces_after_patience_like_torch():
    losses = [1.0, 0.9, 0.95, 0.91, 0.92, 0.93, 0.8, 0.85, 0.85, 0.85, 0.85, 0.85, 0.85]
    s = Schedule(make_opt(), "plateau", epochs=20, steps_per_epoch=1, gamma=0.5,
                 plateau_patience=2)
    opt = make_opt()
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2)
    ours, theirs = [], []
    for loss in losses:
        s.step()
        s.epoch_end(loss)
        ref.step(loss)
        ours.append(s.lr)
        theirs.append(opt.param_groups[0]["lr"])
    assert ours == pytest.approx(theirs)
    # first cut after 3 bad epochs (0.95, 0.91, 0.92 do not beat 0.9): at index 4
    assert ours[:4] == pytest.approx([LR] * 4)
    assert ours[4] == pytest.approx(LR / 2)
    assert ours[-1] < ours[4]


def test_plateau_ignores_missing_val_loss_and_other_kinds():
    s = Schedule(make_opt(), "plateau", epochs=5, steps_per_epoch=1, plateau_patience=0)
    for _ in range(5):
        s.epoch_end(None)
    assert s.lr == LR
    c = Schedule(make_opt(), "none", epochs=5, steps_per_epoch=1, plateau_patience=0)
    for _ in range(5):
        c.epoch_end(1.0)
    assert c.lr == LR


def test_each_param_group_follows_its_own_base_lr():
    opt = make_opt(groups=2)
    s = Schedule(opt, "cosine", epochs=2, steps_per_epoch=2)
    for _ in range(2):
        s.step()
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[1] == pytest.approx(2 * lrs[0])
    assert lrs[0] == pytest.approx(0.5 * LR)


@pytest.mark.parametrize("kind", Schedule.KINDS)
def test_state_dict_round_trip_restores_the_exact_lr(kind):
    kwargs = dict(epochs=6, steps_per_epoch=5, warmup_epochs=1, min_lr=1e-4, step_size=2,
                  t0=2, plateau_patience=0)
    a = Schedule(make_opt(), kind, **kwargs)
    for loss in (1.0, 1.1, 1.2):
        for _ in range(4):
            a.step()
        a.epoch_end(loss)
    state = a.state_dict()
    assert torch.load(_roundtrip(state), weights_only=True) == state  # safe-loader friendly
    b = Schedule(make_opt(), kind, **kwargs)
    assert kind == "none" or b.lr != a.lr
    b.load_state_dict(state)
    assert b.lr == a.lr
    assert b.optimizer.param_groups[0]["lr"] == a.optimizer.param_groups[0]["lr"]
    a.step()
    b.step()
    assert b.lr == a.lr


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf
