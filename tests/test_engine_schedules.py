"""The spec's warmup-cosine values (dpm.md §7.2), poly, and the stateful wrapper."""

import math

import pytest
import torch

from dpm_ops.engine.schedules import LRSchedule, poly_lr, warmup_cosine_lr


def dpm_lr(t, value=0.008, total=150):
    return warmup_cosine_lr(value, t, total, warmup=5, warmup_init=8e-5, lr_min=1.6e-5)


def test_warmup_cosine_matches_the_spec():
    assert [round(dpm_lr(t), 6) for t in range(1, 5)] == [1.664e-3, 3.248e-3, 4.832e-3, 6.416e-3]
    assert dpm_lr(0) == pytest.approx(8e-5)
    assert dpm_lr(5) == pytest.approx(1.6e-5 + 0.5 * (0.008 - 1.6e-5) * (1 + math.cos(math.pi * 5 / 150)))
    assert dpm_lr(50) == pytest.approx(6.00e-3, abs=5e-6)
    assert dpm_lr(100) == pytest.approx(2.01e-3, abs=5e-6)
    assert dpm_lr(149) == pytest.approx(1.69e-5, abs=5e-8)
    assert dpm_lr(150) == 1.6e-5
    # biases warm up from the same absolute init and end at the same absolute floor
    assert warmup_cosine_lr(0.016, 1, 150, 5, 8e-5, 1.6e-5) == pytest.approx(8e-5 + (0.016 - 8e-5) / 5)
    assert warmup_cosine_lr(0.016, 150, 150, 5, 8e-5, 1.6e-5) == 1.6e-5


def test_poly():
    assert poly_lr(0.01, 0, 100, 0.5) == 0.01
    assert poly_lr(0.01, 75, 100, 0.5) == pytest.approx(0.005)
    assert poly_lr(0.01, 100, 100, 0.5) == 0.0
    assert poly_lr(0.01, 101, 100, 0.5) == 0.0  # past the end: held at 0, not a complex root


def test_poly_schedule_defaults_to_the_spec_power():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    LRSchedule(opt, "poly", 100, base_lr=0.01).step(75)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)  # maskreid.md: poly(0.5)


def test_schedule_sets_every_group_and_resumes():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": params[:1], "lr": 0.008}, {"params": params[1:], "lr": 0.016}], lr=0.008)
    sch = LRSchedule(opt, "warmup_cosine", 150, base_lr=0.008, warmup=5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([8e-5, 8e-5])
    sch.step(50)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([dpm_lr(50), dpm_lr(50, 0.016)])
    other = torch.optim.SGD([{"params": params[:1], "lr": 0.008}, {"params": params[1:], "lr": 0.016}], lr=0.008)
    resumed = LRSchedule(other, "warmup_cosine", 150, base_lr=0.008, warmup=5)
    resumed.load_state_dict(sch.state_dict())
    assert [g["lr"] for g in other.param_groups] == [g["lr"] for g in opt.param_groups]
    with pytest.raises(ValueError, match="total"):
        LRSchedule(other, "warmup_cosine", 10, base_lr=0.008, warmup=5).load_state_dict(sch.state_dict())
    poly = LRSchedule(other, "poly", 10, base_lr=0.008).state_dict()
    with pytest.raises(ValueError, match="power"):
        LRSchedule(other, "poly", 10, base_lr=0.008, power=0.9).load_state_dict(poly)
    # the settings a kind does not read may differ: a run whose config held them (accepted, never used, before
    # the config refused them) resumes without them
    LRSchedule(other, "poly", 10, base_lr=0.008, warmup=3, min_lr_factor=0.1).load_state_dict(poly)
    LRSchedule(other, "warmup_cosine", 150, base_lr=0.008, warmup=5, power=0.9).load_state_dict(sch.state_dict())
    constant = LRSchedule(other, "constant", 10, base_lr=0.008, warmup=2, power=2.0).state_dict()
    LRSchedule(other, "constant", 10, base_lr=0.008).load_state_dict(constant)
    with pytest.raises(ValueError, match="schedule"):
        LRSchedule(other, "step", 10, base_lr=0.008)
    for foreign in (None, [], {"kind": "poly"}):  # an AttributeError / KeyError before
        with pytest.raises(ValueError, match="^LRSchedule: a state must be the dict of LRSchedule.state_dict()"):
            resumed.load_state_dict(foreign)


def test_a_second_schedule_on_the_same_optimizer_keeps_the_group_lrs():
    # the first schedule already moved the lrs to warmup_init; the second must still see 0.008 / 0.016
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": params[:1], "lr": 0.008}, {"params": params[1:], "lr": 0.016}], lr=0.008)
    LRSchedule(opt, "warmup_cosine", 150, base_lr=0.008, warmup=5)
    LRSchedule(opt, "warmup_cosine", 150, base_lr=0.008, warmup=5).step(50)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([dpm_lr(50), dpm_lr(50, 0.016)])


def test_constant_and_no_warmup_schedules_and_the_length_check():
    params = [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": params, "lr": 0.05}], lr=0.05)
    constant = LRSchedule(opt, "constant", 10, base_lr=0.05)
    for t in (0, 3, 10, 20):  # DPM's mask-generator optimiser: no schedule at all
        constant.step(t)
        assert opt.param_groups[0]["lr"] == 0.05
    cosine = LRSchedule(opt, "warmup_cosine", 10, base_lr=0.05)  # warmup defaults to 0: cosine from t = 0
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    cosine.step(5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0001 + 0.5 * (0.05 - 0.0001))  # lr_min 0.002 x base
    for total in (0, -3, 10.5):
        with pytest.raises(ValueError, match=f"^LRSchedule: total must be an integer >= 1, got {total}$"):
            LRSchedule(opt, "poly", total, base_lr=0.05)
    LRSchedule(opt, "poly", 1, base_lr=0.05)


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("base_lr", -0.1, "base_lr must be a finite number > 0, got -0.1"),
        ("base_lr", float("nan"), "base_lr must be a finite number > 0, got nan"),
        ("warmup", -1, "warmup must be an integer >= 0, got -1"),
        ("warmup", 1.5, "warmup must be an integer >= 0, got 1.5"),
        ("warmup_factor", 0.0, r"warmup_factor must be a finite number in \(0, 1\], got 0.0"),
        ("min_lr_factor", 2.0, r"min_lr_factor must be a finite number in \[0, 1\], got 2.0"),
        ("power", -1.0, "power must be a finite number > 0, got -1.0"),  # divided by zero at t = total
    ],
)
def test_schedule_settings_out_of_range_are_named(option, value, message):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
    settings = {"base_lr": 0.05, option: value}
    with pytest.raises(ValueError, match=f"^LRSchedule: {message}$"):
        LRSchedule(opt, "poly", 10, **settings)


def test_schedule_steps_are_counts():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
    schedule = LRSchedule(opt, "warmup_cosine", 10, base_lr=0.05, warmup=2)
    with pytest.raises(ValueError, match=r"^LRSchedule: t must be an integer >= 0, got -1$"):
        schedule.step(-1)  # before the warmup's start: an lr below warmup_init
    schedule.step(12)  # past the end: held at lr_min
    assert opt.param_groups[0]["lr"] == pytest.approx(0.002 * 0.05)
