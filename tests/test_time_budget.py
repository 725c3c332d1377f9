"""The time budget (svhn.train.time_budget): a schedule re-sized to end with the epochs that
fit, the run stopped there, and a resume that continues the shortened plan."""

import math
import random
import statistics

import pytest
import torch
from helpers.clock import EpochClock
from helpers.runs import learning_rates, short_fit_args

from svhn.errors import SettingError
from svhn.train import time_budget
from svhn.train.resume import ResumeError
from svhn.train.time_budget import TimeBudget, resize_schedule

CLOCK = ("--trainer.callbacks+=helpers.clock.EpochClock",)


@pytest.fixture
def epoch_clock(monkeypatch):
    """Training time as the budget sees it: 10 s per epoch."""
    EpochClock.now = 0.0
    monkeypatch.setattr(time_budget, "_now", lambda: EpochClock.now)


def _one_cycle(total_steps: int, **kwargs) -> torch.optim.lr_scheduler.OneCycleLR:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.01, total_steps=total_steps,
                                               pct_start=0.2, **kwargs)


def _rates(scheduler, steps: int) -> list[float]:
    """The rate and the momentum (beta1) after each of ``steps`` steps, in turn."""
    group = scheduler.optimizer.param_groups[0]
    seen = []
    for _ in range(steps):
        scheduler.optimizer.step()
        scheduler.step()
        seen += [group["lr"], group["betas"][0]]
    return seen


@pytest.mark.parametrize("three_phase", [False, True])
def test_a_resized_one_cycle_continues_as_one_built_for_the_new_length(three_phase):
    resized, fresh = _one_cycle(100, three_phase=three_phase), _one_cycle(
        60, three_phase=three_phase)
    _rates(resized, 10)  # still warming up: from here on it must match the 60-step cycle
    _rates(fresh, 10)
    assert resize_schedule(resized, 60)
    assert _rates(resized, 49) == pytest.approx(_rates(fresh, 49), rel=1e-9)
    assert resized.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 / 25 / 1e4)
    _rates(resized, 1)  # the 60th step (after the last one trained with)
    with pytest.raises(ValueError, match="Tried to step"):
        _rates(resized, 1)  # its end is the new one


def test_a_resized_cosine_reaches_its_floor_at_the_new_end():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 100, eta_min=0.001)
    rates = [optimizer.param_groups[0]["lr"]]
    for step in range(40):
        optimizer.step()
        cosine.step()
        if step == 9:
            assert resize_schedule(cosine, 40)
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates[-1] == pytest.approx(0.001)
    assert all(a >= b for a, b in zip(rates, rates[1:]))  # still falling, no jump
    assert not resize_schedule(torch.optim.lr_scheduler.StepLR(optimizer, 5), 10)


def test_a_budget_must_be_positive():
    with pytest.raises(SettingError, match="time_budget.minutes"):
        TimeBudget(minutes=0)


def _budget_args(*extra: str) -> tuple[str, ...]:
    # 8 epochs of 3 steps planned; at 10 s per epoch, 35 s hold 3 of them.
    return short_fit_args("--model.optimizer", "adamw", "--model.scheduler", "onecycle",
                          "--model.lr", "0.01", "--trainer.max_epochs", "8",
                          "--time_budget.minutes", str(35 / 60), *CLOCK, *extra)


def _one_cycle_rates(total_steps: int) -> list[float]:
    scheduler = _one_cycle(total_steps)
    first = [scheduler.optimizer.param_groups[0]["lr"]]
    return first + _rates(scheduler, total_steps - 1)[::2]


SHORTENED = _one_cycle_rates(24)[:3] + _one_cycle_rates(9)[3:]


def test_the_budget_ends_the_schedule_and_the_run_with_the_epochs_that_fit(
        easy_data_dir, easy_fit, epoch_clock, tmp_path, caplog):
    run = easy_fit(easy_data_dir, tmp_path / "cache", tmp_path / "runs", *_budget_args())
    # 3 epochs; the first on the 8 epochs' one-cycle, then the plan known: the rest of a
    # 9-step cycle, its anneal run to the end (not 3 of 8 epochs' cycle, cut off).
    assert learning_rates(run.metrics, "lr-AdamW") == pytest.approx(SHORTENED, rel=1e-6)
    assert torch.load(run.last, weights_only=True)["epoch"] == 2
    assert "3 epochs fit at 10 s per epoch (max_epochs 8)" in caplog.text


def test_without_a_budget_the_schedule_keeps_its_length(easy_data_dir, easy_fit, epoch_clock,
                                                        tmp_path):
    run = easy_fit(easy_data_dir, tmp_path / "cache", tmp_path / "runs",
                   *_budget_args("--trainer.max_epochs", "3", "--time_budget.minutes",
                                 "null"))
    assert learning_rates(run.metrics, "lr-AdamW") == pytest.approx(_one_cycle_rates(9),
                                                                    rel=1e-6)
    longer = easy_fit(easy_data_dir, tmp_path / "cache", tmp_path / "runs_long",
                      *_budget_args("--trainer.max_epochs", "4", "--time_budget.minutes",
                                    "10"))  # the budget holds them all: nothing changes
    assert learning_rates(longer.metrics, "lr-AdamW") == pytest.approx(_one_cycle_rates(12),
                                                                       rel=1e-6)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")  # EarlyStopping
def test_a_run_shortened_by_its_budget_resumes_to_the_same_end(easy_data_dir, easy_fit,
                                                               epoch_clock, tmp_path):
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    stop = tmp_path / "stop_after_first_epoch.yaml"
    stop.write_text("trainer:\n  callbacks:\n"
                    "    - class_path: lightning.pytorch.callbacks.EarlyStopping\n"
                    "      init_args: {monitor: val/seq_acc, mode: max, "
                    "stopping_threshold: -1.0}\n"
                    "    - class_path: helpers.clock.EpochClock\n")
    first = easy_fit(easy_data_dir, cache, runs, "--config", str(stop),
                     *_budget_args()[:-len(CLOCK)])
    assert torch.load(first.last, weights_only=True)["epoch"] == 0
    with pytest.raises(ResumeError, match="time_budget"):  # its schedule is 9 steps, not 24
        easy_fit(easy_data_dir, cache, runs, *_budget_args("--time_budget.minutes", "null"),
                 "--ckpt_path", str(first.last))
    resumed = easy_fit(easy_data_dir, cache, runs, *_budget_args(),
                       "--ckpt_path", str(first.last))
    assert resumed.metrics.parent == first.metrics.parent
    assert torch.load(resumed.last, weights_only=True)["epoch"] == 2
    assert learning_rates(resumed.metrics, "lr-AdamW") == pytest.approx(SHORTENED, rel=1e-6)
    assert not math.isnan(resumed.best_score)


def test_a_budget_stops_a_run_without_an_end_or_a_schedule(easy_data_dir, easy_fit,
                                                            epoch_clock, tmp_path):
    run = easy_fit(easy_data_dir, tmp_path / "cache", tmp_path / "runs",
                   *_budget_args("--trainer.max_epochs", "-1", "--model.scheduler", "none"))
    assert torch.load(run.last, weights_only=True)["epoch"] == 2  # 3 epochs of 10 s in 35


def _replans_over(monkeypatch, epoch_seconds: list[float], minutes: float,
                  max_epochs: int) -> list[int]:
    """The plans a budget re-sizes the schedule to, epoch by epoch, on a fake clock and a
    fake trainer (one rank, no schedule, 10 batches an epoch)."""
    return _fake_run(monkeypatch, [(10, seconds, 0.0) for seconds in epoch_seconds],
                     minutes, max_epochs)[0]


def _wobbling_epochs(seed: int) -> list[float]:
    """A GPU run's epoch times: a first epoch of 6 s (the workers' start), then 3.2-3.8 s."""
    draw = random.Random(seed)
    return [6.0] + [round(draw.uniform(3.2, 3.8), 2) for _ in range(44)]


def test_epoch_times_that_wobble_do_not_resize_the_schedule_up_and_down(monkeypatch):
    # As on the H200: 40 epochs planned, about 38 fit in the budget.
    margin = time_budget.GROW_MARGIN

    def runs(margin: float) -> list[list[int]]:
        monkeypatch.setattr(time_budget, "GROW_MARGIN", margin)
        return [_replans_over(monkeypatch, _wobbling_epochs(seed), 138 / 60, 40)
                for seed in range(20)]

    at_once, with_margin = runs(0.0), runs(margin)
    assert sum(map(len, with_margin)) <= 0.6 * sum(map(len, at_once))
    # ... and hardly an epoch lost: the plans end where they did, give or take one.
    assert all(abs(a[-1] - b[-1]) <= 1 for a, b in zip(at_once, with_margin, strict=True))
    assert statistics.mean(plans[-1] for plans in with_margin) >= 37.5


def test_a_slow_first_epoch_does_not_hold_the_plan_down(monkeypatch):
    # A 20 s first epoch (start-up), then 2 s epochs, 60 s: 20 more epochs fit after it.
    plans = _replans_over(monkeypatch, [20.0] + [2.0] * 30, 1.0, 40)
    assert plans[0] == 3  # after the first epoch alone: 2 more of its kind would fit
    assert plans[1] >= 19 and plans[-1] in (20, 21)


def test_a_plan_grows_back_when_epochs_get_clearly_faster(monkeypatch):
    # 10 s epochs plan 10 of 20 in 100 s; then 2 s epochs: many more fit, and the plan grows.
    plans = _replans_over(monkeypatch, [10.0] * 3 + [2.0] * 30, 100 / 60, 20)
    assert plans[0] == 10 and max(plans) > 10


def _fake_run(monkeypatch, epochs: list[tuple[int, float, float]], minutes: float,
              max_epochs: int) -> tuple[list[int], TimeBudget]:
    """A budget over a fake clock and trainer: each epoch (batches, seconds, seconds of
    one-off work after it, set aside as a pseudo-labelling round does)."""
    from types import SimpleNamespace

    now = [0.0]
    monkeypatch.setattr(time_budget, "_now", lambda: now[0])
    budget = TimeBudget(minutes=minutes)
    trainer = SimpleNamespace(current_epoch=0, max_epochs=max_epochs, global_step=0,
                              num_training_batches=0, accumulate_grad_batches=1,
                              should_stop=False, lr_scheduler_configs=[],
                              strategy=SimpleNamespace(broadcast=lambda value, src: value))
    plans = []
    monkeypatch.setattr(TimeBudget, "_replan",
                        lambda self, trainer, planned, done, per_epoch: plans.append(planned))
    budget.on_train_start(trainer, None)
    for epoch, (batches, seconds, one_off) in enumerate(epochs):
        trainer.current_epoch, trainer.num_training_batches = epoch, batches
        budget.on_train_epoch_start(trainer, None)
        now[0] += seconds
        trainer.global_step += batches
        budget.on_train_epoch_end(trainer, None)
        now[0] += one_off
        budget.set_aside(one_off)
        if trainer.should_stop:
            break
    return plans, budget


def test_one_off_work_is_spent_from_the_budget_but_not_taken_for_epoch_time(monkeypatch):
    # 10 s epochs in 200 s: 20 fit. A 50 s pass after epoch 5 takes 5 epochs' time once;
    # counted as epoch time it would also make every later epoch look longer.
    plans, _ = _fake_run(monkeypatch, [(10, 10.0, 50.0 if e == 4 else 0.0)
                                       for e in range(30)], 200 / 60, 40)
    assert plans[-1] == 15


def test_epochs_that_grow_are_planned_at_their_new_size(monkeypatch):
    # 10 batches in 10 s, then from epoch 6 on 20 batches (20 s) in a 200 s budget: 5 epochs
    # of 10 s and 7 of 20 s fit (50 + 140 = 190 s); at the old size 19 would be planned.
    plans, _ = _fake_run(monkeypatch, [(10, 10.0, 0.0)] * 5 + [(20, 20.0, 0.0)] * 20,
                         200 / 60, 40)
    assert plans[-1] == 12


def test_a_schedule_follows_epochs_that_change_size_without_a_budget():
    from types import SimpleNamespace

    scheduler = _one_cycle(100)  # sized for 10 epochs of 10 batches
    for _ in range(30):
        scheduler.optimizer.step()
        scheduler.step()
    trainer = SimpleNamespace(current_epoch=3, max_epochs=10, global_step=30,
                              num_training_batches=10, accumulate_grad_batches=1,
                              lr_scheduler_configs=[SimpleNamespace(scheduler=scheduler,
                                                                    interval="step")])
    budget = TimeBudget()  # no budget: still the owner of the schedule's length
    budget.on_train_epoch_start(trainer, None)
    trainer.num_training_batches = 15  # pseudo-labelled images joined
    budget.on_train_epoch_start(trainer, None)
    assert scheduler.total_steps == 30 + 7 * 15
