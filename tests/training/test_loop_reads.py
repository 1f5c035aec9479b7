"""The training loop never waits for the device between its reads (densenet_efficient.training.loop).

The running loss and error sums stay on the device and are read a few times a second; a
non-finite loss skips every optimizer step on the device until the next read, which stops the run.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import densenet_efficient.training.checkpoint as checkpoint
import densenet_efficient.training.loop as loop
from densenet_efficient import densenet_bc
from densenet_efficient.training import NonFiniteLossError, TrainConfig, train
from densenet_efficient.training.distributed import DistInfo

from ..support import REPO as ROOT
from ..support.fakedata import write_image_folder

#: 80 training images in micro-batches of 4: with reads as rare as the schedule allows, an epoch
#: reads after micro-batches 1, 3, 7 and 15 (each interval at most doubles) and at its end.
MICRO_BATCHES = 20
READS = [1, 3, 7, 15, 20]


def _config(cifar: Path, save: Path, **kw) -> TrainConfig:
    base = {
        "data": str(cifar),
        "depth": 10,
        "growth_rate": 6,
        "batch_size": 4,
        "valid_size": 20,
        "n_epochs": 1,
        "save": str(save),
        "progress": False,
        "download": False,
        "workers": 0,
    }
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def rare_reads(monkeypatch) -> list[int]:
    """Reads as rare as the schedule allows (the interval never reached), recorded by micro-batch."""
    monkeypatch.setattr(loop, "READ_INTERVAL", 1e9)
    at: list[int] = []
    real = loop._Tally.read

    def read(self):
        at.append(self.done)
        return real(self)

    monkeypatch.setattr(loop._Tally, "read", read)
    return at


class _ScalarReads(TorchDispatchMode):
    """Counts the ATen op behind ``.item()``, ``float()``, ``bool()`` and ``int()`` of a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


class _Loaded:
    """A loader's epoch of batches, loaded up front: the count below is of the training alone, not
    of the data pipeline (torchvision's random transforms draw their numbers with ``.item()``)."""

    def __init__(self, loader) -> None:
        self.batches = list(loader)
        self.sampler, self.batch_size, self.drop_last = loader.sampler, loader.batch_size, loader.drop_last

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_an_epoch_reads_the_device_only_at_its_scheduled_reads(
    cifar, tmp_path, monkeypatch, rare_reads, accum_steps
):
    """No scalar read at all in a training epoch (forward, loss, backward, optimizer step), and
    one ``tolist`` per scheduled read: 5 for 20 micro-batches, not 3 per micro-batch."""
    scalar_reads: list[int] = []
    tolists = {"n": 0}
    real_tolist, real_epoch = torch.Tensor.tolist, loop._train_epoch

    def tolist(self):
        tolists["n"] += 1
        return real_tolist(self)

    def counted_epoch(run, loader, desc):
        loaded = _Loaded(loader)
        with _ScalarReads() as mode:
            monkeypatch.setattr(torch.Tensor, "tolist", tolist)
            try:
                return real_epoch(run, loaded, desc)
            finally:
                monkeypatch.setattr(torch.Tensor, "tolist", real_tolist)
                scalar_reads.append(mode.count)

    monkeypatch.setattr(loop, "_train_epoch", counted_epoch)
    result = train(_config(cifar, tmp_path / "run", accum_steps=accum_steps))
    assert result.epochs_completed == 1
    assert scalar_reads == [0]
    assert rare_reads == READS and tolists["n"] == len(READS)


def test_the_epoch_loss_and_error_are_the_means_over_every_image(cifar, tmp_path, monkeypatch):
    """The device-side sums give exactly what summing each micro-batch's loss x images on the
    host gave (the reference below), a short last micro-batch and accumulation included."""
    seen: list[tuple[float, int, int]] = []
    real_loss = loop._loss_fn

    def recorded(out, y):
        loss = real_loss(out, y)
        seen.append((loss.item(), int((out.argmax(1) != y).sum()), y.numel()))
        return loss

    monkeypatch.setattr(loop, "_loss_fn", recorded)
    result = train(_config(cifar, tmp_path / "run", batch_size=6, accum_steps=2, n_epochs=2))
    per_epoch = math.ceil(80 / 6)
    for epoch, row in enumerate(result.history):
        batches = seen[epoch * per_epoch : (epoch + 1) * per_epoch]
        loss_sum = err_sum = count = 0.0
        for loss, errors, n in batches:
            loss_sum += loss * n
            err_sum += float(errors)
            count += n
        assert count == 80 and batches[-1][2] == 80 % 6
        assert row["train_loss"] == loss_sum / count
        assert row["train_error"] == err_sum / count


def _capture_run(monkeypatch) -> dict[str, loop._Run]:
    """The run ``train`` builds, kept for the test to look at after ``train`` raised."""
    runs: dict[str, loop._Run] = {}
    real = loop._build_run

    def build(*args, **kwargs):
        runs["run"] = real(*args, **kwargs)
        return runs["run"]

    monkeypatch.setattr(loop, "_build_run", build)
    return runs


def _trained_state(run: loop._Run) -> list[torch.Tensor]:
    """Every parameter and momentum buffer, copied."""
    params = list(run.model.parameters())
    return [t.detach().clone() for t in params] + [
        run.optimizer.state[p]["momentum_buffer"].clone() for p in params
    ]


@pytest.mark.parametrize(
    ("accum_steps", "bad_call", "value"),
    [(1, 10, math.inf), (2, 9, math.nan)],  # (2, 9): the first micro-batch of a group
)
def test_a_non_finite_loss_skips_every_step_until_the_read_that_stops_the_run(
    cifar, tmp_path, monkeypatch, rare_reads, accum_steps, bad_call, value
):
    """One non-finite loss in epoch 1 (micro-batch 10 or 9); the read after micro-batch 15 stops
    the run with the loop's message. The micro-batches between ran (their losses were finite),
    yet the weights and momentum buffers are exactly those of before the bad micro-batch: its
    step and every step after it were skipped on the device."""
    runs = _capture_run(monkeypatch)
    real_loss = loop._loss_fn
    calls = {"n": 0}
    before: list[torch.Tensor] = []

    def diverges_once(out, y):
        calls["n"] += 1
        loss = real_loss(out, y)
        if calls["n"] != bad_call:
            return loss
        before.extend(_trained_state(runs["run"]))  # as the last finite step left them
        return loss * value

    monkeypatch.setattr(loop, "_loss_fn", diverges_once)
    with pytest.raises(
        NonFiniteLossError, match=rf"^the training loss became {value} in epoch 1/2; stopping\."
    ):
        train(_config(cifar, tmp_path / "run", accum_steps=accum_steps, n_epochs=2))
    assert calls["n"] == 15 and rare_reads == [1, 3, 7, 15]
    after = _trained_state(runs["run"])
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


@pytest.mark.parametrize("scaled", [False, True], ids=["no_scaler", "grad_scaler"])
def test_steps_after_a_non_finite_loss_are_skipped_on_the_device_with_or_without_grad_scaler(scaled):
    """The step itself, on the CPU: without a scaler the fused SGD takes the epoch's flag as its
    ``found_inf``; with GradScaler (``--amp fp16`` on a GPU) the flagged micro-batches' gradients
    are made NaN and the scaler skips the step, as it skips any inf step, and backs off its scale.
    A finite micro-batch after the bad one is skipped too: the flag lasts until the read."""
    torch.manual_seed(0)
    model = densenet_bc(10, growth_rate=6, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, fused=True)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [1])
    scaler = torch.amp.GradScaler("cpu", enabled=scaled)
    run = loop._Run(TrainConfig(), "digits", Path("unused"), model, optimizer, scheduler, scaler, DistInfo(),
                    torch.device("cpu"), net=model)  # fmt: skip
    tally = loop._Tally(run.device, run.info)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))

    def step(poisoned: bool = False) -> None:
        if poisoned:
            loop._forward_backward(run, x * math.inf, y, 1.0, tally)  # a NaN loss
        else:
            loop._forward_backward(run, x, y, 1.0, tally)
        loop._optimizer_step(run, tally)
        optimizer.zero_grad(set_to_none=True)

    step()
    step()
    good = [t.detach().clone() for t in model.parameters()]
    good_state = {k: v["momentum_buffer"].clone() for k, v in optimizer.state_dict()["state"].items()}
    step(poisoned=True)
    step()  # finite, but after the bad one: skipped too
    assert all(torch.equal(a, b) for a, b in zip(good, model.parameters(), strict=True))
    state = optimizer.state_dict()["state"]
    assert state.keys() == good_state.keys()
    assert all(torch.equal(state[k]["momentum_buffer"], v) for k, v in good_state.items())
    assert math.isnan(tally.read()[0])
    if scaled:
        assert scaler.get_scale() == 2.0**16 / 4  # backed off once per skipped step


def test_a_checkpoint_of_unfused_sgd_resumes_into_the_fused_step():
    """A run saved before the loop used fused SGD holds ``fused=None``: resuming keeps the step
    fused (the device-side skip needs it) and takes the hyperparameters and buffers as they are."""
    model = densenet_bc(10, growth_rate=6, num_classes=10)
    old = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    old.step()
    saved = old.state_dict()
    assert saved["param_groups"][0]["fused"] is None
    new = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, fused=True)
    checkpoint._load_optimizer(new, saved)
    group = new.param_groups[0]
    assert group["fused"] is True and group["lr"] == 0.05
    buffers = [new.state[p]["momentum_buffer"] for p in model.parameters()]
    assert all(
        torch.equal(a, old.state[p]["momentum_buffer"])
        for a, p in zip(buffers, model.parameters(), strict=True)
    )


@pytest.mark.parametrize(("planned", "longer", "at"), [(4, 8, 3), (4, 10, 4), (2, 7, 2), (8, 9, 6)])
def test_a_lengthened_schedule_is_bit_for_bit_the_one_planned_for_it(planned, longer, at):
    """``rescheduled`` gives the schedule, through ``load_state_dict``, the state a MultiStepLR
    planned for ``longer`` epochs from the start has after ``at`` epochs: milestones, LR, and the
    LR it gives from there on."""
    import warnings

    from densenet_efficient.training.config import lr_milestones

    def stepped(
        n_epochs: int, epochs: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.MultiStepLR]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=lr_milestones(n_epochs), gamma=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # stepping the schedule without training
            for _ in range(epochs):
                sched.step()
        return opt, sched

    _, stored = stepped(planned, at)
    want_opt, want = stepped(longer, at)
    got_opt, got = stepped(longer, 0)
    checkpoint._load_schedule(got, got_opt, stored.state_dict(), planned, longer)
    assert got.milestones == want.milestones and got.get_last_lr() == want.get_last_lr()
    assert [g["lr"] for g in got_opt.param_groups] == [g["lr"] for g in want_opt.param_groups]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(longer - at):
            got.step()
            want.step()
            assert got.get_last_lr() == want.get_last_lr()


def test_torchrun_ranks_stop_together_when_one_ranks_loss_is_non_finite(tmp_path):
    """``torchrun --nproc_per_node 2`` on CPU, rank 1's loss non-finite once: every rank reads at
    the same micro-batch (the read is all-reduced, its schedule too), so both stop with the
    message instead of one waiting forever in the other's gradient all-reduce."""
    data = tmp_path / "data"
    write_image_folder(data / "train", classes=("a", "b", "c"), per_class=8, size=32)
    launcher = tmp_path / "launch.py"
    launcher.write_text(
        textwrap.dedent("""
        import math, os, sys
        import densenet_efficient.training.loop as loop
        from densenet_efficient import cli
        real, calls = loop._loss_fn, [0]
        def diverges_on_rank_1(out, y):
            calls[0] += 1
            loss = real(out, y)
            return loss * math.inf if os.environ["RANK"] == "1" and calls[0] == 4 else loss
        loop._loss_fn = diverges_on_rank_1
        sys.exit(cli.main(sys.argv[1:]))
    """)
    )
    argv = ["train", "--data", str(data), "--image-size", "32", "--depth", "10", "--growth-rate", "6"]
    argv += ["--n-epochs", "2", "--batch-size", "2", "--workers", "0", "--save", str(tmp_path / "run")]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(launcher), *argv, "--no-progress"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode != 0
    assert proc.stderr.count("the training loss became inf in epoch 1/2; stopping") == 2, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
