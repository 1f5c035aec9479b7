"""Hostile input, round two, for training: options that overflow or lie, checkpoints edited after
they were written, a broken torchrun environment, temporaries an interrupted save left behind.

Each input is the test's own (not the review's examples). "Nothing written" is checked on the
run folder: it must not exist after a refused fresh run, and must be byte-identical after a
refused resume.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import densenet_efficient.training.loop as loop
from densenet_efficient.errors import UsageError
from densenet_efficient.io.atomic import remove_stale_temporaries
from densenet_efficient.training import TrainConfig, train
from densenet_efficient.training.checkpoint import check_run_folder
from densenet_efficient.training.config import check_settings, describe_default, lr_milestones
from densenet_efficient.training.data import DATA_DEFAULTS, build_data

from ..support import REPO
from ..support.fakedata import point_cifar10_at, write_fake_cifar10, write_image_folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- options: every one checked before anything is written ---------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"valid_size": math.nan}, r"--valid-size must be a count >= 0 or a fraction in \(0, 1\), found nan"),
        ({"valid_size": math.inf}, "--valid-size .* found inf"),
        ({"valid_size": -3}, "--valid-size .* found -3"),
        ({"valid_size": 1.5}, "--valid-size .* found 1.5"),
        ({"lr": -1e-3}, r"--lr must be a finite number in \(0, inf\), found -0.001"),
        ({"lr": math.nan}, "--lr .* found nan"),
        ({"lr": "0.1"}, "--lr .* found '0.1'"),
        ({"momentum": -0.1}, r"--momentum must be a finite number in \[0, 1\), found -0.1"),
        ({"momentum": 1.0}, "--momentum .* found 1.0"),
        ({"weight_decay": -5e-4}, r"--weight-decay must be a finite number in \[0, inf\)"),
        ({"weight_decay": math.inf}, "--weight-decay .* found inf"),
        ({"drop_rate": 1.0}, r"--drop-rate must be a finite number in \[0, 1\)"),
        ({"workers": -2}, r"--workers must be an integer in 0..256, found -2"),
        ({"workers": 10**6}, "--workers .* found 1000000"),
        (
            {"seed": 2**64 + 7},
            r"--seed must be an integer in 0..9223372036854775807, found 18446744073709551623",
        ),
        ({"seed": -1}, "--seed .* found -1"),
        ({"seed": 10**5000}, "--seed .* found an integer of about 5001 digits"),
        ({"seed": 1.0}, "--seed .* found 1.0"),
        ({"n_epochs": 0}, "--n-epochs must be an integer >= 1, found 0"),
        ({"accum_steps": True}, "--accum-steps must be an integer >= 1, found True"),
        ({"stop_after": -1}, "--stop-after .* found -1"),
        ({"batch_size": 0}, "--batch-size must be an integer >= 1, found 0"),
        ({"batch_size": "all"}, "--batch-size .* found 'all'"),
        # beyond sys.maxsize: was a ValueError traceback from the DataLoader's islice mid-epoch
        (
            {"batch_size": 2**63},
            r"--batch-size must be at most 9223372036854775807, found 9223372036854775808",
        ),
        ({"growth_rate": 0}, "--growth-rate .* found 0"),
        ({"depth": 10.0}, "--depth must be an integer >= 10, found 10.0"),
        ({"image_size": 0}, r"--image-size must be an integer in 1..8192, found 0"),
        ({"image_size": 10**9}, "--image-size .* found 1000000000"),
        ({"amp": "fp8"}, "--amp must be one of None, bf16, fp16, found 'fp8'"),
        ({"mode": ["naive"]}, "--mode must be one of .* found \\['naive'\\]"),
        ({"dataset": "mnist"}, "--dataset must be one of auto, digits"),
        ({"data": 5}, "--data must be a string, found 5"),
        ({"progress": "no"}, "--progress must be true or false, found 'no'"),
        ({"memory": 4 * 2**30}, "--memory must be a size such as 4GiB, or auto, found 4294967296"),
    ],
)
def test_options_out_of_range_or_of_the_wrong_type_are_refused_before_anything_is_written(
    tmp_path, options, message
):
    save = tmp_path / "run"
    with pytest.raises(UsageError, match=message):
        train(**{"save": str(save), "progress": False, **options})
    assert not save.exists()


def test_image_size_where_it_does_not_apply_is_refused(tmp_path):
    for dataset in ("digits", "auto"):
        with pytest.raises(
            UsageError, match="--image-size 48 applies to ImageFolders; the digits images are 32x32"
        ):
            train(dataset=dataset, image_size=48, save=str(tmp_path / "run"), progress=False)
    with pytest.raises(UsageError, match="image_size=64 applies to ImageFolders"):
        build_data("digits", image_size=64)
    assert not (tmp_path / "run").exists()


def test_image_size_below_what_the_architecture_accepts_is_refused(tmp_path):
    data = write_image_folder(tmp_path / "flowers", classes=("a", "b"), per_class=2, size=8)
    with pytest.raises(
        UsageError, match="--image-size 20 is below the smallest input densenet121 accepts \\(29"
    ):
        train(data=str(data), arch="densenet121", image_size=20, save=str(tmp_path / "run"), progress=False)
    with pytest.raises(
        UsageError, match="--image-size 3 is below the smallest input densenet_bc_10 accepts \\(4"
    ):
        train(data=str(data), depth=10, image_size=3, save=str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()


def test_lr_milestones_are_exact_integers_at_any_epoch_count():
    for n in [*range(1, 2000), 2**52 - 1, 10**15 + 3]:
        assert lr_milestones(n) == [max(1, int(0.5 * n)), max(1, int(0.75 * n))], n
    huge = 10**400  # 0.5 * huge is an OverflowError
    assert lr_milestones(huge) == [huge // 2, 3 * huge // 4]


def test_help_defaults_are_the_defaults_the_code_uses():
    assert describe_default("depth") == "22 for digits, 100 for CIFAR and ImageFolders"
    assert describe_default("valid_size").startswith(f"{DATA_DEFAULTS['digits']['valid_size']} for digits")
    assert describe_default("momentum") == str(TrainConfig().momentum)
    assert describe_default("download") == "on"
    help_text = subprocess.run(
        [sys.executable, "-m", "densenet_efficient", "train", "--help"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "300"},
        check=True,
    ).stdout  # fmt: skip
    for name in ("depth", "n_epochs", "valid_size", "lr", "seed", "workers", "batch_size"):
        assert describe_default(name) in help_text, name


def test_check_settings_names_where_a_value_came_from():
    with pytest.raises(
        UsageError, match=r"^ckpt: its setting lr must be a finite number in \(0, inf\), found 'x'$"
    ):
        check_settings({"lr": "x"}, lambda name: f"ckpt: its setting {name}")
    check_settings(TrainConfig().to_dict())  # the defaults pass


# -- the environment -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORLD_SIZE": "4"}, "WORLD_SIZE=4 but RANK is not set: start distributed training with torchrun"),
        ({"WORLD_SIZE": "four", "RANK": "0"}, "environment variable WORLD_SIZE='four' is not an integer"),
        ({"WORLD_SIZE": "9" * 40, "RANK": "0"}, "environment variable WORLD_SIZE=.* is not an integer"),
        ({"WORLD_SIZE": "0"}, "environment variable WORLD_SIZE must be an integer >= 1, found 0"),
        ({"WORLD_SIZE": "3", "RANK": "3"}, "environment variable RANK must be an integer in 0..2, found 3"),
        ({"WORLD_SIZE": "3", "RANK": "1", "LOCAL_RANK": "-1"}, "LOCAL_RANK must be an integer >= 0"),
    ],
)
def test_a_broken_torchrun_environment_is_one_sentence(tmp_path, monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UsageError, match=message):
        train(save=str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()


# -- checkpoints edited after they were written -----------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("hostile")
    md5s = write_fake_cifar10(root / "cifar", per_batch=20, test_size=20)
    with pytest.MonkeyPatch.context() as mp:
        point_cifar10_at(mp, md5s)
        train(_tiny(root, n_epochs=1))
    return root, md5s


def _tiny(root: Path, **kw) -> TrainConfig:
    base = dict(data=str(root / "cifar"), depth=10, growth_rate=6, batch_size=16, valid_size=20, n_epochs=2,
                save=str(root / "run"), progress=False, download=False, workers=0)  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def copy(finished, tmp_path, monkeypatch) -> Path:
    import shutil

    root, md5s = finished
    point_cifar10_at(monkeypatch, md5s)
    shutil.copytree(root / "run", tmp_path / "run")
    os.symlink(root / "cifar", tmp_path / "cifar")
    return tmp_path


def _edit(ckpt: dict, what: str) -> str:
    """Edit one stored value as a user (or a bad tool) might; return what the refusal must say."""
    config, plan_fields = ckpt["config"], {"blocks": ["efficient"] * 3, "stem": "efficient"}
    if what == "lr_string":
        config["lr"] = "0.1"
        return r"its setting lr must be a finite number in \(0, inf\), found '0.1'"
    if what == "seed_huge":
        config["seed"] = 2**80
        return "its setting seed must be an integer in 0..9223372036854775807"
    if what == "workers_negative":
        config["workers"] = -4
        return "its setting workers must be an integer in 0..256, found -4"
    if what == "depth_float":
        config["depth"] = 10.0
        return "its setting depth must be an integer >= 10, found 10.0"
    if what == "n_epochs_inf":
        config["n_epochs"] = math.inf
        return "its config's n_epochs is inf"
    if what == "growth_huge":
        config["growth_rate"] = 10**6  # would allocate terabytes if built before the comparison
        return "its model does not fit the densenet_bc_10_k1000000 .* shape mismatch"
    if what == "plan_unknown_key":
        ckpt["memory_plan"] = {**plan_fields, "speed": "fast"}
        return "its memory_plan: unknown field\\(s\\) speed"
    if what == "plan_string_number":
        ckpt["memory_plan"] = {**plan_fields, "budget": "lots"}
        return "its memory_plan: budget must be an integer >= 0, found 'lots'"
    if what == "plan_bad_block":
        ckpt["memory_plan"] = {**plan_fields, "blocks": ["efficient", {"keep": 1}, 3]}
        return r"its memory_plan: blocks\[1\] must be a mode, a layer count or a list of booleans"
    if what == "batch_size_huge":  # was: ValueError from the DataLoader's islice, mid-epoch
        config["batch_size"] = 10**19
        return "its setting batch_size must be at most 9223372036854775807, found 10000000000000000000"
    if what == "memory_negative":  # was: "memory budget must look like ..." naming neither file nor field
        config["memory"] = "-1GiB"
        return r"its setting memory must be a size such as 4GiB, or auto, found '-1GiB' \(memory budget must"
    if what == "memory_too_large":
        config["memory"] = "17EiB"
        return "its setting memory must be a size such as 4GiB, or auto, found '17EiB' .*at most 16 EiB"
    if what == "plan_without_memory":  # was: the plan silently dropped, the run went on in its mode
        ckpt["memory_plan"] = {**plan_fields, "blocks": ["max_saving"] * 3, "budget": 2**27, "batch_size": 16}
        return "it has a memory_plan but its setting memory is None"
    if what == "plan_other_batch":  # was: batch 10**6 trained (and printed) with a plan fitted to 16
        config["memory"], config["batch_size"] = "128MiB", 10**6
        ckpt["memory_plan"] = {**plan_fields, "budget": 2**27, "batch_size": 16}
        return "its memory_plan was fitted to a batch of 16, but its setting batch_size is 1000000"
    if what == "batch_size_auto":  # was: ValueError from int() deep in the budget code
        config["batch_size"] = "auto"
        return "its config's batch_size is 'auto', expected the batch size the run trained with"
    if what == "history_extra_column":
        ckpt["history"][0]["note"] = "good epoch"
        return "its history has a row with {'note': 'good epoch'}"
    if what == "history_string":
        ckpt["history"][0]["lr"] = "0.1"
        return "its history has a row with {'lr': '0.1'}"
    if what == "best_epoch":
        ckpt["best_epoch"] = 7
        return r"its best_epoch is 7, expected an epoch in 1..1 or None"
    if what == "weight_not_tensor":
        ckpt["model"]["features.conv0.weight"] = [[0.0]]
        return "its model does not fit .* 'features.conv0.weight' is a list, not a tensor"
    if what == "optimizer_lr_string":
        ckpt["optimizer"]["param_groups"][0]["lr"] = "0.1"
        return (
            r"its optimizer state cannot be restored \(TypeError: param group lr is '0.1', expected a number"
        )
    if what == "optimizer_buffer_shape":
        state = ckpt["optimizer"]["state"]
        first = next(iter(state))
        state[first]["momentum_buffer"] = torch.zeros(3)
        return r"its optimizer state cannot be restored .*momentum buffer of shape"
    raise AssertionError(what)


EDITS = [
    "lr_string", "seed_huge", "workers_negative", "depth_float", "n_epochs_inf", "growth_huge",
    "plan_unknown_key", "plan_string_number", "plan_bad_block", "batch_size_auto", "batch_size_huge",
    "memory_negative", "memory_too_large", "plan_without_memory", "plan_other_batch", "history_extra_column",
    "history_string", "best_epoch", "weight_not_tensor", "optimizer_lr_string", "optimizer_buffer_shape",
]  # fmt: skip


@pytest.mark.parametrize("what", EDITS)
def test_an_edited_checkpoint_is_refused_naming_the_file_the_field_and_the_value(copy, monkeypatch, what):
    run = copy / "run"
    path = run / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    message = _edit(ckpt, what)
    torch.save(ckpt, path)
    before = _snapshot(run)

    def never(*args, **kwargs):
        raise AssertionError("a model was built from a checkpoint that does not fit it")

    if what in ("growth_huge", "weight_not_tensor"):
        monkeypatch.setattr(loop, "_build_model", never)
    with pytest.raises(UsageError, match=message) as err:
        train(save=str(run), resume=True, progress=False, n_epochs=2)
    assert str(path) in str(err.value) and len(str(err.value).splitlines()) == 1
    assert _snapshot(run) == before


def test_resume_of_a_checkpoint_saying_batch_size_auto_is_one_line_from_the_cli(copy, capsys):
    """The case that ended in ``ValueError: invalid literal for int()``: a stored plan beside a
    stored ``"batch_size": "auto"`` (a run always stores the batch it resolved)."""
    from densenet_efficient import cli

    run = copy / "run"
    path = run / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["batch_size"] = "auto"
    ckpt["memory_plan"] = {"blocks": ["efficient"] * 3, "stem": "efficient"}
    torch.save(ckpt, path)
    before = _snapshot(run)
    assert cli.main(["train", "--save", str(run), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"checkpoint {path} cannot be resumed: its config's batch_size is 'auto'" in err
    assert _snapshot(run) == before


def test_a_folder_where_the_checkpoint_should_be_is_named_as_a_folder(tmp_path):
    (tmp_path / "run" / "checkpoint.pt").mkdir(parents=True)
    with pytest.raises(UsageError, match=r"cannot resume from .*checkpoint.pt: it is a folder"):
        train(save=str(tmp_path / "run"), resume=True, progress=False)


# -- temporaries of an interrupted save --------------------------------------------------------------


def _killed_while_writing(path: Path) -> None:
    """Start ``atomic_write(path)`` in another process and kill it (SIGKILL-like) mid-write."""
    code = (
        "import os, sys; from densenet_efficient.io import atomic; "
        "os.fsync = lambda fd: os._exit(9); atomic.atomic_write(sys.argv[1], b'half')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)], env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert proc.returncode == 9


def test_temporaries_of_an_interrupted_save_are_removed_and_nothing_else(copy):
    run = copy / "run"
    for name in ("checkpoint.pt", "log.csv"):
        _killed_while_writing(run / name)
    ours = sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp"))
    assert len(ours) == 2 and all(n.startswith((".checkpoint.pt.", ".log.csv.")) for n in ours)
    staged = run / ".last.q1w2e3r4.partial"
    staged.mkdir()
    (staged / "model.safetensors").write_bytes(b"half")
    foreign = {
        ".checkpoint.pt.mine.tmp": b"a user's",  # not mkstemp's 8 characters
        "notes.tmp": b"notes",
        ".other.abcdefgh.tmp": b"another program's",
        ".checkpoint.pt.abcdefgh.bak": b"backup",
    }
    for name, data in foreign.items():
        (run / name).write_bytes(data)
    (copy / "target").write_bytes(b"keep me")
    os.symlink(copy / "target", run / ".log.csv.linklink.tmp")
    before = torch.load(run / "checkpoint.pt", weights_only=True)["epoch"]

    train(save=str(run), resume=True, progress=False, n_epochs=2)

    left = {p.name for p in run.iterdir()}
    assert not any(n in left for n in ours) and staged.name not in left
    assert all((run / name).read_bytes() == data for name, data in foreign.items())
    assert (run / ".log.csv.linklink.tmp").is_symlink() and (copy / "target").read_bytes() == b"keep me"
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == before + 1


def test_remove_stale_temporaries_touches_only_the_names_asked_for(tmp_path):
    (tmp_path / ".a.txt.abc_1234.tmp").write_text("x")
    (tmp_path / ".b.txt.abc_1234.tmp").write_text("x")
    (tmp_path / ".a.txt.abc_1234.partial").write_text("a file, not a staged folder")
    removed = remove_stale_temporaries(tmp_path, ["a.txt"])
    assert [p.name for p in removed] == [".a.txt.abc_1234.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.txt.abc_1234.partial", ".b.txt.abc_1234.tmp"]
    assert remove_stale_temporaries(tmp_path / "missing", ["a.txt"]) == []
    with check_run_folder(tmp_path):  # a run folder check cleans only the run's own names
        pass
    assert (tmp_path / ".b.txt.abc_1234.tmp").exists()
