"""Hostile input, round two, at the command line: one line on stderr, exit code 2, nothing written;
and a reader that leaves (a closed stdout) neither tracebacks nor kills a training run."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from densenet_efficient import cli
from densenet_efficient.training.checkpoint import read_run_checkpoint

from ..support import REPO

_ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--valid-size", "nan"], r"--valid-size must be a count >= 0 or a fraction in \(0, 1\), found nan"),
        (["--valid-size=-inf"], "--valid-size .* found -inf"),
        (["--valid-size", "2.5"], "--valid-size .* found 2.5"),
        (["--lr", "-0.5"], r"--lr must be a finite number in \(0, inf\), found -0.5"),
        (["--lr", "inf"], "--lr .* found inf"),
        (["--momentum", "-1"], "--momentum .* found -1.0"),
        (["--weight-decay", "nan"], "--weight-decay .* found nan"),
        (["--workers", "-8"], "--workers must be an integer in 0..256, found -8"),
        (
            ["--seed", str(2**64)],
            "--seed must be an integer in 0..9223372036854775807, found 18446744073709551616",
        ),
        (["--seed", "9" * 3000], r"--seed .* found an integer of about 300\d digits"),
        (["--n-epochs", "-3"], "--n-epochs must be an integer >= 1, found -3"),
        (["--accum-steps", "0"], "--accum-steps must be an integer >= 1, found 0"),
        (["--drop-rate", "1.5"], r"--drop-rate must be a finite number in \[0, 1\)"),
        (["--growth-rate", "-12"], "--growth-rate must be an integer >= 1, found -12"),
        (["--growth-rate", "1000000"], r"would have [\d,]+ parameters, .* more than the .* of memory of cpu"),
        (["--image-size", "64"], "--image-size 64 applies to ImageFolders; the digits images are 32x32"),
        (["--image-size", "0"], "--image-size must be an integer in 1..8192, found 0"),
        (
            ["--arch", "densenet_bc_" + "7" * 5000],
            r"unknown architecture 'densenet_bc_7777.*\.\.\..*'; expected",
        ),
    ],
)
def test_train_options_that_overflow_or_lie_are_one_line_and_write_nothing(tmp_path, capsys, argv, message):
    save = tmp_path / "run"
    assert cli.main(["train", *argv, "--save", str(save), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("densenet-efficient train: error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not save.exists()


def test_resume_from_a_folder_named_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "run" / "checkpoint.pt").mkdir(parents=True)
    assert cli.main(["train", "--save", str(tmp_path / "run"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "it is a folder, expected the run's checkpoint file" in err and "does not exist" not in err


def test_a_closed_stdout_ends_plan_silently(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "densenet_efficient", "plan", "--depth", "40", "--memory", "2GiB",
         "--batch-size", "16"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_ENV,
    )  # fmt: skip
    proc.stdout.close()  # `plan ... | true`: the reader leaves before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141  # as SIGPIPE would end it
    assert err == ""  # no BrokenPipeError traceback, no "Exception ignored" at shutdown


def test_a_training_run_outlives_the_reader_of_its_log(tmp_path):
    """`PYTHONUNBUFFERED=1 densenet-efficient train ... | head -1`: the run trains every epoch and
    saves its checkpoint although nobody reads its log after the first line."""
    save = tmp_path / "run"
    argv = [sys.executable, "-m", "densenet_efficient", "train", "--depth", "10", "--growth-rate", "2",
            "--valid-size", "0.8", "--batch-size", "128", "--n-epochs", "2", "--no-progress", "--save", str(save)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_ENV)
    first = proc.stdout.readline().decode()
    proc.stdout.close()  # head -1 exits
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=600) == 0, err
    assert first.startswith("DenseNet(k=2, blocks=(1, 1, 1)")
    assert "stdout was closed; training continues, see log.csv" in err and "Traceback" not in err
    ckpt = read_run_checkpoint(save / "checkpoint.pt")
    assert ckpt["epoch"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert len((save / "log.csv").read_text().splitlines()) == 3
