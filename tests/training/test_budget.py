"""Training to a memory budget: ``--memory``, ``--batch-size auto`` and ``--accum-steps``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import densenet_efficient.training.loop as loop
from densenet_efficient import cli, densenet_bc
from densenet_efficient.models.config import densenet_bc_config
from densenet_efficient.models.planner import fit_memory, max_batch_size
from densenet_efficient.training import TrainConfig, train
from densenet_efficient.training.budget import accumulation_weights, suggest_accumulation
from densenet_efficient.training.checkpoint import read_run_checkpoint
from densenet_efficient.training.distributed import DistInfo

#: The fake CIFAR-10 below: 100 training images, 20 held out -> 80 train at 32x32.
TRAIN_IMAGES = 80
#: A budget that fits a batch of a few dozen of the tiny model in max_saving but not 64.
SMALL = "100MiB"
PLANNER = {"image_size": 32, "device": "cpu", "optimizer": "momentum", "amp": None}


def _argv(cifar: Path, save: Path, *extra: str) -> list[str]:
    return [
        "train",
        *("--data", str(cifar), "--depth", "10", "--growth-rate", "6", "--valid-size", "20"),
        *("--n-epochs", "1", "--no-progress", "--no-download", "--workers", "0", "--device", "cpu"),
        *("--save", str(save), *extra),
    ]


def _config(cifar: Path, save: Path, **kw) -> TrainConfig:
    base = dict(
        data=str(cifar), depth=10, growth_rate=6, valid_size=20, n_epochs=1, save=str(save),
        progress=False, download=False, workers=0, device="cpu",
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _tiny_arch():
    return densenet_bc_config(10, 6, num_classes=10)


# -- accumulation ---------------------------------------------------------------------------------


def test_accumulation_weights_make_each_group_one_mean():
    assert accumulation_weights([8] * 4, 1) == [1.0] * 4
    # a short last group and a smaller last micro-batch: each group's weights sum to 1, by images
    assert accumulation_weights([15] * 5 + [5], 2) == [0.5, 0.5, 0.5, 0.5, 0.75, 0.25]
    assert accumulation_weights([16] * 5, 2) == [0.5, 0.5, 0.5, 0.5, 1.0]
    assert suggest_accumulation(64, 16) == (16, 4)
    assert suggest_accumulation(64, 13) == (13, 5) and suggest_accumulation(64, 100) == (64, 1)


def test_accumulated_gradients_equal_the_full_batch_gradient_float64():
    """Two micro-batches (5 + 3 images) weighted by accumulation_weights give the gradient of
    one batch of 8, through the loop's own forward/backward (BN in eval mode: no batch statistics)."""
    torch.manual_seed(0)
    model = densenet_bc(10, growth_rate=6, num_classes=10, memory_efficient="max_saving").double().eval()
    x, y = torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (8,))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [1])
    run = loop._Run(TrainConfig(), "digits", Path("unused"), model, optimizer, scheduler, scaler, DistInfo(),
                    torch.device("cpu"), net=model)  # fmt: skip
    tally = loop._Tally(run.device, run.info)

    loop._forward_backward(run, x, y, 1.0, tally)
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    for (xs, ys), w in zip([(x[:5], y[:5]), (x[5:], y[5:])], accumulation_weights([5, 3], 2), strict=True):
        loop._forward_backward(run, xs, ys, w, tally)
    for a, b in zip(full, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
    # without the weights it is the sum of two means, not the mean: the weights matter
    model.zero_grad(set_to_none=True)
    for xs, ys in [(x[:5], y[:5]), (x[5:], y[5:])]:
        loop._forward_backward(run, xs, ys, 1.0, tally)
    assert not torch.allclose(next(model.parameters()).grad, full[0])


@pytest.mark.parametrize(("batch", "micro", "steps"), [(30, 15, 2), (40, 10, 4)])
def test_accumulating_micro_batches_trains_like_the_full_batch(cifar, tmp_path, batch, micro, steps):
    """With frozen features (BN on running statistics), the loop with --accum-steps gives the
    weights and the loss of the full batch, the epoch's short last group included (80 = 30+30+20)."""
    a = train(_config(cifar, tmp_path / "a", batch_size=batch, freeze_features=True))
    b = train(_config(cifar, tmp_path / "b", batch_size=micro, accum_steps=steps, freeze_features=True))
    for key, value in a.model.state_dict().items():
        torch.testing.assert_close(b.model.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert b.history[0]["train_loss"] == pytest.approx(a.history[0]["train_loss"], rel=1e-6)
    # stepping on every micro-batch instead would differ
    c = train(_config(cifar, tmp_path / "c", batch_size=micro, freeze_features=True))
    assert not torch.allclose(c.model.classifier.weight, a.model.classifier.weight, atol=1e-4)


# -- choosing the batch and the plan --------------------------------------------------------------


@pytest.mark.parametrize(("memory", "expected"), [(SMALL, None), ("2GiB", TRAIN_IMAGES)])
def test_batch_size_auto_takes_the_largest_batch_that_fits(cifar, tmp_path, capsys, memory, expected):
    if expected is None:
        expected = max_batch_size(_tiny_arch(), memory, mode="max_saving", **PLANNER)
        assert 1 < expected < TRAIN_IMAGES  # the budget decides, not the data set's size
    save = tmp_path / "run"
    assert cli.main(_argv(cifar, save, "--memory", memory, "--batch-size", "auto", "--accum-steps", "2")) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("memory: "))
    assert (
        f"memory: budget {memory.replace('MiB', ' MiB').replace('GiB', ' GiB')} (--memory {memory}) -> "
        f"batch {expected} x 2 accumulation steps (effective {2 * expected}), plan: " in line
    )
    ckpt = read_run_checkpoint(save / "checkpoint.pt")
    assert ckpt["config"]["batch_size"] == expected and ckpt["config"]["memory"] == memory
    # the plan the line names is the one the model trained with, and the one the planner fits
    plan = fit_memory(_tiny_arch(), memory, batch_size=expected, **PLANNER)
    assert ckpt["memory_plan"]["blocks"] == plan.to_json()["blocks"]
    assert f"plan: {plan};" in line


def test_memory_applies_the_fitted_plan_to_the_model(cifar, tmp_path, capsys):
    # DenseNet-BC-16 (k=6), batch 32 on CPU: 104.0 MiB in max_saving, 107.8 MiB efficient; fit_memory
    # plans for 98% of 108 MiB, 105.8 MiB: between
    result = train(_config(cifar, tmp_path / "run", depth=16, batch_size=32, memory="108MiB"))
    plan = fit_memory(densenet_bc_config(16, 6, num_classes=10), "108MiB", batch_size=32, **PLANNER)
    assert plan.mode is None, "a budget between the modes: a mixed plan"
    assert str(result.model.memory_plan) == str(plan)
    out = capsys.readouterr().out
    assert "mode=plan (--memory)" in out and f"plan: {result.model.memory_plan};" in out


def test_memory_plans_the_channels_last_step_the_run_trains(monkeypatch):
    """``train --channels-last --memory``: the planner prices the step in channels_last (it holds
    less on CPU than the contiguous one, so planning the contiguous step recomputed more than the
    budget asks)."""
    from densenet_efficient.models.planner import estimate_memory
    from densenet_efficient.training.data import DataBundle

    data = DataBundle("fake", list(range(80)), None, None, [str(i) for i in range(10)], 32, True)
    c = TrainConfig(depth=10, growth_rate=6, channels_last=True, memory="200MiB", batch_size=8, device="cpu")
    _, choice = loop._choose_budget(c, data, DistInfo(rank=0, world_size=1), torch.device("cpu"), None)
    step = {**PLANNER, "mode": choice.plan}
    assert choice.plan.estimated_peak == estimate_memory(_tiny_arch(), batch_size=8, channels_last=True, **step).total
    assert choice.plan.estimated_peak != estimate_memory(_tiny_arch(), batch_size=8, **step).total



def test_memory_plans_the_dropout_the_run_trains_with():
    """``train --drop-rate 0.2 --memory``: the step keeps a dropout mask per layer, which the
    planner prices (it was planned without dropout, below what the run holds)."""
    from densenet_efficient.models.planner import estimate_memory
    from densenet_efficient.training.data import DataBundle

    data = DataBundle("fake", list(range(80)), None, None, [str(i) for i in range(10)], 32, True)
    c = TrainConfig(depth=10, growth_rate=6, drop_rate=0.2, memory="200MiB", batch_size=8, device="cpu")
    _, choice = loop._choose_budget(c, data, DistInfo(rank=0, world_size=1), torch.device("cpu"), None)
    step = {**PLANNER, "mode": choice.plan}
    assert choice.plan.estimated_peak == estimate_memory(_tiny_arch(), batch_size=8, drop_rate=0.2, **step).total
    assert choice.plan.estimated_peak > estimate_memory(_tiny_arch(), batch_size=8, **step).total


def test_memory_plans_the_frozen_features_the_run_trains_with():
    """``train --freeze-features --memory``: only the classifier trains, which the planner prices
    (it planned the whole network's backward: several times what the run holds)."""
    from densenet_efficient.models.planner import estimate_memory
    from densenet_efficient.training.data import DataBundle

    data = DataBundle("fake", list(range(80)), None, None, [str(i) for i in range(10)], 32, True)
    c = TrainConfig(depth=10, growth_rate=6, freeze_features=True, memory="200MiB", batch_size=8, device="cpu")
    _, choice = loop._choose_budget(c, data, DistInfo(rank=0, world_size=1), torch.device("cpu"), None)
    step = {**PLANNER, "mode": choice.plan}
    frozen = estimate_memory(_tiny_arch(), batch_size=8, freeze_features=True, **step).total
    assert choice.plan.estimated_peak == frozen < estimate_memory(_tiny_arch(), batch_size=8, **step).total

@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--memory", SMALL, "--batch-size", "64"],
            r"^densenet-efficient train: error: 100 MiB is below what densenet_bc_10_k6 needs for a batch of "
            r"64 .*; the largest batch that fits 100 MiB is (\d+); train with --batch-size (\d+) "
            r"--accum-steps (\d+) for an effective batch of (\d+), or give a larger --memory$",
        ),
        (["--memory", "8MiB"], r"not even a batch of 1 fits 8 MiB"),
        (["--memory", "4GiB", "--mode", "naive"], r"--memory 4GiB and --mode naive both given"),
        (["--memory", "lots"], r"memory budget must look like 8GiB"),
        (["--memory", "auto"], r"--memory auto on cpu: only a CUDA device has free memory"),
        (["--batch-size", "auto"], r"--batch-size auto on cpu: .*give a budget, e.g. --memory 4GiB"),
        (["--accum-steps", "0"], r"--accum-steps must be an integer >= 1, found 0"),
        (["--batch-size", "many"], None),  # argparse's own error (exit 2)
    ],
)
def test_budget_errors_are_one_line_and_write_nothing(cifar, tmp_path, capsys, argv, message):
    save = tmp_path / "run"
    if message is None:
        with pytest.raises(SystemExit) as exc:
            cli.main(_argv(cifar, save, *argv))
        assert exc.value.code == 2 and "expected a number of images or auto" in capsys.readouterr().err
        return
    assert cli.main(_argv(cifar, save, *argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    match = re.search(message, err)
    assert match, err
    if "--accum-steps (" in message:
        largest, batch, steps, effective = map(int, match.groups())
        assert largest == max_batch_size(_tiny_arch(), SMALL, mode="max_saving", **PLANNER)
        assert batch <= largest and effective == batch * steps >= 64
    assert not save.exists()


# -- resuming -------------------------------------------------------------------------------------


def test_resume_keeps_the_resolved_batch_and_plan_and_refuses_other_accumulation(cifar, tmp_path, capsys):
    budget = ("--memory", SMALL, "--batch-size", "auto", "--accum-steps", "2", "--n-epochs", "2")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert cli.main(_argv(cifar, straight, *budget)) == 0
    assert cli.main(_argv(cifar, stopped, *budget, "--stop-after", "1")) == 0
    capsys.readouterr()

    assert cli.main(_argv(cifar, stopped, "--resume", "--accum-steps", "3", "--n-epochs", "2")) == 2
    err = capsys.readouterr().err
    assert "--accum-steps 3 (the run has 2) would change its numbers" in err

    # auto again on resume means the run's batch; the stored plan is reused, not refitted
    assert cli.main(_argv(cifar, stopped, "--resume", "--batch-size", "auto", "--n-epochs", "2")) == 0
    out = capsys.readouterr().out
    assert "(the run's stored plan)" in out
    a, b = read_run_checkpoint(straight / "checkpoint.pt"), read_run_checkpoint(stopped / "checkpoint.pt")
    assert b["epoch"] == 2 and b["config"]["batch_size"] == a["config"]["batch_size"]
    assert b["memory_plan"] == a["memory_plan"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_resume_takes_the_run_s_budget_however_it_is_spelled(cifar, tmp_path, capsys):
    """``--memory 100MiB`` on a run trained with ``--memory 104857600`` is the same budget: it
    continues the run (it was refused as a setting that "would change its numbers"); another
    budget is still refused."""
    save = tmp_path / "run"
    budget = ("--batch-size", "8", "--n-epochs", "2")
    assert cli.main(_argv(cifar, save, "--memory", "104857600", *budget, "--stop-after", "1")) == 0
    capsys.readouterr()
    assert cli.main(_argv(cifar, save, "--resume", "--memory", "200MiB", *budget)) == 2
    assert "--memory 200MiB (the run has 104857600) would change its numbers" in capsys.readouterr().err
    assert cli.main(_argv(cifar, save, "--resume", "--memory", SMALL, *budget)) == 0
    assert read_run_checkpoint(save / "checkpoint.pt")["epoch"] == 2


def test_resume_of_a_budget_run_refuses_mode_as_a_fresh_run_does(cifar, tmp_path, capsys):
    """``--mode`` on ``--resume`` of a run whose plan ``--memory`` chose: refused in one line, as
    ``--memory`` with ``--mode`` is on a fresh run. ``--mode efficient`` was accepted silently (the
    run's unused default mode) while the run went on in its stored plan, and ``--mode naive`` was
    refused saying the run "has efficient"."""
    save = tmp_path / "run"
    budget = ("--memory", SMALL, "--batch-size", "auto", "--n-epochs", "2")
    assert cli.main(_argv(cifar, save, *budget, "--stop-after", "1")) == 0
    capsys.readouterr()
    before = (save / "checkpoint.pt").read_bytes()
    for mode in ("efficient", "naive", "max_saving"):
        assert cli.main(_argv(cifar, save, "--resume", "--mode", mode, "--n-epochs", "2")) == 2, mode
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert f"--mode {mode} (the run's plan comes from --memory {SMALL})" in err, err
    assert (save / "checkpoint.pt").read_bytes() == before
