"""Training, resuming and fine-tuning (densenet_efficient.training), through the API and the CLI."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import densenet_efficient.training.loop as train_mod
from densenet_efficient import cli, densenet_bc, densenet_bc_100, from_pretrained
from densenet_efficient.errors import UsageError
from densenet_efficient.models import weights as weights_mod
from densenet_efficient.training import NonFiniteLossError, TrainConfig, train
from densenet_efficient.training.checkpoint import LOG_COLUMNS
from densenet_efficient.training.checkpoint import read_run_checkpoint as load_checkpoint
from densenet_efficient.training.config import lr_milestones

from ..support import REPO as ROOT
from ..support.fakedata import point_cifar10_at, write_fake_cifar10, write_image_folder
from ..support.hub_server import randomize_, serve, sha256


def _tiny(cifar: Path, save: Path, **kw) -> TrainConfig:
    base = {
        "data": str(cifar),
        "depth": 10,
        "growth_rate": 6,
        "batch_size": 16,
        "valid_size": 20,
        "n_epochs": 3,
        "save": str(save),
        "progress": False,
        "download": False,
        "workers": 0,
    }
    return TrainConfig(**{**base, **kw})


def _tiny_argv(cifar: Path, n_epochs: int, *extra: str) -> list[str]:
    """``_tiny``'s run as ``densenet-efficient train`` arguments (growth rate 6 unless overridden)."""
    return [
        *("--data", str(cifar), "--depth", "10", "--valid-size", "20", "--batch-size", "16"),
        *("--n-epochs", str(n_epochs), "--no-progress", "--no-download"),
        *(extra if "--growth-rate" in extra else ("--growth-rate", "6", *extra)),
    ]


def _read_log(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _cli(*argv: str) -> int:
    return cli.main(["train", *argv])


# -- learning -------------------------------------------------------------------------------------


def test_embedded_default_learns(tmp_path):
    """The README's first command trains on scikit-learn's digits; a small DenseNet-BC learns them.

    Slow by necessity (4 real epochs over the digits): it is the one test that learning happens.
    """
    result = train(depth=10, n_epochs=4, batch_size=32, save=str(tmp_path / "run"), progress=False)
    accuracy = 1 - result.test_error
    # Chance is 10%; measured 2-core CPU: ~0.9 (see README). The margin absorbs seeds and BLAS.
    assert accuracy > 0.6, result.history
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.finished and result.epochs_completed == 4


def test_cli_trains_fake_cifar10_with_the_demo_schedule(cifar, tmp_path, capsys):
    save = tmp_path / "run"
    rc = _cli(*_tiny_argv(cifar, 4, "--save", str(save), "--workers", "0"))
    assert rc == 0
    out = capsys.readouterr().out
    assert "cifar10 32x32: 80 train / 20 valid images, 10 classes" in out and "test (best model" in out
    rows = _read_log(save / "log.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"] and tuple(rows[0]) == LOG_COLUMNS
    # SGD lr 0.1, x0.1 at 50% and 75% of the epochs (MultiStepLR milestones 2 and 3).
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    assert all(float(r["peak_memory_mb"]) > 0 and float(r["epoch_seconds"]) > 0 for r in rows)
    assert all(0 <= float(r[k]) <= 1 for r in rows for k in ("train_error", "valid_error"))

    ckpt = load_checkpoint(save / "checkpoint.pt")  # weights_only=True inside
    assert ckpt["epoch"] == 4 and ckpt["config"]["depth"] == 10 and ckpt["config"]["mode"] == "efficient"
    group = ckpt["optimizer"]["param_groups"][0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.9, True, 1e-4)
    model = densenet_bc(10, growth_rate=6, num_classes=10)
    model.load_state_dict(ckpt["model"])
    assert not list(save.glob(".*tmp*"))  # atomic writes leave no temporaries


# -- resuming -------------------------------------------------------------------------------------


def _assert_same_run(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert ca["epoch"] == cb["epoch"]
    for key, value in ca["model"].items():
        assert torch.equal(value, cb["model"][key]), key
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert ca["scheduler"] == cb["scheduler"]
    numbers = ("train_loss", "train_error", "valid_loss", "valid_error", "lr")
    assert [[r[k] for k in numbers] for r in _read_log(a / "log.csv")] == [
        [r[k] for k in numbers] for r in _read_log(b / "log.csv")
    ]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    """The uninterrupted reference of the resume tests: ``_tiny``'s 3 epochs with dropout (so the
    resumed run must replay the dropout masks' random stream too), trained once per module on the
    same fake CIFAR-10 the ``cifar`` fixture writes."""
    root = tmp_path_factory.mktemp("straight")
    md5s = write_fake_cifar10(root / "cifar", per_batch=20, test_size=20)
    with pytest.MonkeyPatch.context() as mp:
        point_cifar10_at(mp, md5s)
        train(_tiny(root / "cifar", root / "run", drop_rate=0.1))
    return root / "run"


def test_killed_and_resumed_run_ends_with_identical_weights(cifar, tmp_path, monkeypatch, straight_run):

    # Kill the second run in the middle of epoch 2 (batch 8 of 5 + 5 per epoch).
    calls = {"n": 0}
    real_loss = train_mod._loss_fn

    def dies(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt  # what SIGINT/SIGTERM-as-interrupt does to a real run
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_mod, "_loss_fn", dies)
    with pytest.raises(KeyboardInterrupt):
        train(_tiny(cifar, tmp_path / "killed", drop_rate=0.1))
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["epoch"] == 1
    monkeypatch.setattr(train_mod, "_loss_fn", real_loss)

    # Resume with other runtime settings: the stored configuration decides the numbers.
    result = train(TrainConfig(save=str(tmp_path / "killed"), resume=True, progress=False, workers=1))
    assert result.epochs_completed == 3 and result.finished
    _assert_same_run(straight_run, tmp_path / "killed")


def test_stop_after_then_resume_via_cli(cifar, tmp_path, straight_run):
    common = _tiny_argv(cifar, 3, "--drop-rate", "0.1")
    save = str(tmp_path / "sliced")
    assert _cli(*common, "--save", save, "--stop-after", "2") == 0
    assert len(_read_log(tmp_path / "sliced" / "log.csv")) == 2
    assert _cli("--save", save, "--resume", "--no-progress") == 0
    _assert_same_run(straight_run, tmp_path / "sliced")


# -- failures -------------------------------------------------------------------------------------


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(cifar, tmp_path, monkeypatch, capsys):
    real_loss = train_mod._loss_fn
    calls = {"n": 0}

    def diverges(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * math.inf if calls["n"] >= 7 else loss  # epoch 2, second batch

    monkeypatch.setattr(train_mod, "_loss_fn", diverges)
    save = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"became (inf|nan) in epoch 2/3; stopping"):
        train(_tiny(cifar, save))
    ckpt = load_checkpoint(save / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert len(_read_log(save / "log.csv")) == 1

    # Through the CLI: exit code 1 and one clear line.
    calls["n"] = 0
    args = _tiny_argv(cifar, 3, "--growth-rate", "12", "--save", str(tmp_path / "cli"))
    assert _cli(*args) == 1
    assert "the training loss became" in capsys.readouterr().err


@pytest.fixture
def snapshot():
    def take(folder: Path) -> dict[str, bytes]:
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    return take


@pytest.mark.parametrize(
    ("make", "argv", "message"),
    [
        (lambda d: None, ["--data", "{d}/nowhere"], "data directory .*nowhere does not exist"),
        (
            lambda d: write_image_folder(d / "one", classes=("cat",), per_class=2),
            ["--data", "{d}/one", "--image-size", "32"],
            r"has 1 class folder \(cat\); a classifier needs at least 2",
        ),
        (
            lambda d: None,
            ["--depth", "50"],
            "depth must be of the form 6n\\+4 with n >= 1 \\(e.g. 46, 52\\), got 50",
        ),
        (lambda d: None, ["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs a CUDA GPU"),
        (lambda d: None, ["--arch", "densenet999"], "unknown architecture 'densenet999'"),
        (lambda d: None, ["--device", "foo"], "--device 'foo' is not a device training can run on"),
        (lambda d: None, ["--device", "meta"], "--device 'meta' is not a device training can run on"),
    ],
)
def test_bad_inputs_are_one_clear_line_and_write_nothing(tmp_path, capsys, make, argv, message):
    make(tmp_path)
    save = tmp_path / "run"
    rc = _cli(*[a.format(d=tmp_path) for a in argv], "--save", str(save), "--no-progress")
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("densenet-efficient train: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not save.exists()


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory) -> tuple[Path, dict, list[dict]]:
    """``_tiny``'s run of one epoch at lr 0.05 (trained once per module): its folder, its CIFAR md5
    lists and its history."""
    root = tmp_path_factory.mktemp("one_epoch")
    md5s = write_fake_cifar10(root / "cifar", per_batch=20, test_size=20)
    with pytest.MonkeyPatch.context() as mp:
        point_cifar10_at(mp, md5s)
        result = train(_tiny(root / "cifar", root / "run", n_epochs=1, lr=0.05))
    return root / "run", md5s, result.history


def _private_copy(run: Path, md5s: dict, tmp_path: Path, monkeypatch) -> Path:
    """A copy of a module's shared run folder for one test, its data readable by torchvision."""
    point_cifar10_at(monkeypatch, md5s)
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def one_epoch_copy(one_epoch_run, tmp_path, monkeypatch) -> Path:
    """A private copy of :func:`one_epoch_run`'s folder."""
    run, md5s, _ = one_epoch_run
    return _private_copy(run, md5s, tmp_path, monkeypatch)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not_a_training_checkpoint"])
def test_corrupt_checkpoint_on_resume_is_refused_and_untouched(one_epoch_copy, capsys, snapshot, damage):
    save = one_epoch_copy
    path = save / "checkpoint.pt"
    if damage == "garbage":
        path.write_bytes(b"this is not a checkpoint")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        torch.save({"state_dict": {}}, path)
    before = snapshot(save)
    assert _cli("--save", str(save), "--resume", "--no-progress") == 2
    err = capsys.readouterr().err
    assert f"checkpoint {path}" in err and "not a densenet-efficient training checkpoint" in err
    assert snapshot(save) == before


def test_existing_run_is_not_overwritten_without_resume_or_overwrite(cifar, one_epoch_copy, capsys, snapshot):
    save = one_epoch_copy
    before = snapshot(save)
    args = _tiny_argv(cifar, 1, "--growth-rate", "12", "--save", str(save))
    assert _cli(*args) == 2
    assert "already holds a training run (checkpoint.pt); pass --resume" in capsys.readouterr().err
    assert snapshot(save) == before
    assert _cli(*args, "--overwrite") == 0
    assert load_checkpoint(save / "checkpoint.pt")["config"]["growth_rate"] == 12


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert _cli("--save", str(tmp_path / "empty"), "--resume") == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err


# -- options --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["naive", "efficient"])
def test_bf16_autocast_trains_on_cpu(cifar, tmp_path, mode):
    result = train(_tiny(cifar, tmp_path / "run", n_epochs=1, amp="bf16", mode=mode))
    row = result.history[0]
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["valid_loss"])
    assert result.model.features.conv0.weight.dtype == torch.float32  # autocast keeps fp32 master weights
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["config"]["amp"] == "bf16"


def test_channels_last_trains_in_the_efficient_mode(cifar, tmp_path):
    result = train(_tiny(cifar, tmp_path / "run", n_epochs=1, channels_last=True))
    assert result.model.memory_efficient == "efficient"
    assert math.isfinite(result.history[0]["train_loss"])
    assert result.model.features.conv0.weight.is_contiguous(memory_format=torch.channels_last)


def test_freeze_features_trains_only_the_classifier(cifar, tmp_path):
    result = train(_tiny(cifar, tmp_path / "run", n_epochs=1, freeze_features=True))
    torch.manual_seed(0)
    initial = densenet_bc(10, growth_rate=6, num_classes=10).state_dict()
    final = result.model.state_dict()
    for key, value in initial.items():
        if key.startswith("features."):  # weights and BN running statistics untouched
            assert torch.equal(value, final[key]), key
    assert not torch.equal(initial["classifier.weight"], final["classifier.weight"])


# -- fine-tuning and saved models -----------------------------------------------------------------


def test_finetunes_an_imagefolder_from_locally_served_pretrained_weights(tmp_path, monkeypatch, capsys):
    # "Published" weights: a 10-class CIFAR DenseNet-BC-100 (random here), served from localhost and
    # registered with its own preprocessing (resize 36, crop 32) through the manifest override.
    torch.manual_seed(1)
    source = randomize_(densenet_bc_100()).state_dict()
    files = tmp_path / "files"
    files.mkdir()
    torch.save(source, files / "w.pth")
    name = f"densenet_bc_100-{sha256(files / 'w.pth')[:8]}.pth"
    os.replace(files / "w.pth", files / name)
    data = tmp_path / "flowers"
    write_image_folder(data / "train", classes=("daisy", "rose", "tulip"), per_class=4, size=48)
    write_image_folder(data / "val", classes=("daisy", "rose", "tulip"), per_class=2, size=48, seed=1)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    save = tmp_path / "run"
    with serve(files) as base:
        preprocessing = {
            "resize_size": 36,
            "crop_size": 32,
            "interpolation": "bilinear",
            "antialias": True,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.25, 0.25, 0.25],
        }
        entry = {"url": f"{base}/{name}", "num_classes": 10, "preprocessing": preprocessing}
        manifest = {
            "format": weights_mod.MANIFEST_FORMAT,
            "architectures": {"densenet_bc_100": {"default": "CIFAR10", "weights": {"CIFAR10": entry}}},
        }
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        monkeypatch.setenv(weights_mod.MANIFEST_ENV, str(tmp_path / "manifest.json"))
        with pytest.warns(UserWarning, match=r"re-initialised classifier\.weight, classifier\.bias"):
            result = train(
                TrainConfig(
                    arch="densenet_bc_100",
                    pretrained=True,
                    data=str(data),
                    freeze_features=True,
                    n_epochs=2,
                    batch_size=6,
                    save=str(save),
                    progress=False,
                    workers=0,
                )
            )
    assert "imagefolder 32x32: 12 train / 6 valid images, 3 classes" in capsys.readouterr().out
    model = result.model
    assert model.classifier.weight.shape == (3, model.num_features)
    for key, value in model.state_dict().items():
        if key.startswith("features."):  # the pretrained features, loaded and kept (frozen)
            assert torch.equal(value, source[key]), key
    assert load_checkpoint(save / "checkpoint.pt")["optimizer"]["param_groups"][0]["initial_lr"] == 0.01

    # The best and last models are Hub folders that from_pretrained loads as the trained model.
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    for folder in ("best", "last"):
        loaded = from_pretrained(save / folder)
        assert loaded.arch_config.num_classes == 3
        assert {p.name for p in (save / folder).iterdir()} >= {
            "model.safetensors",
            "config.json",
            "README.md",
        }
    last = from_pretrained(save / "last", memory_efficient=model.memory_efficient)
    for key, value in model.state_dict().items():
        assert torch.equal(value, last.state_dict()[key]), key
    with torch.no_grad():
        assert torch.allclose(last(x), model(x), atol=1e-5)
    assert "daisy" in (save / "last" / "README.md").read_text()


def test_pretrained_without_a_named_architecture_is_refused(tmp_path, capsys):
    assert _cli("--pretrained", "--save", str(tmp_path / "run")) == 2
    assert "--pretrained needs --arch" in capsys.readouterr().err


# -- many processes -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [["naive"], ["efficient", "--compile"]], ids=["naive", "efficient-compiled"])
def test_torchrun_two_processes_gloo_only_rank0_writes(tmp_path, mode):
    """``torchrun --nproc_per_node 2`` on CPU: DDP + DistributedSampler, one writer, and batch norm
    synchronised over the two processes (``--sync-bn``) in naive mode and in an engine mode under
    ``torch.compile`` (the synchronised ops)."""
    data = tmp_path / "data"
    write_image_folder(data / "train", classes=("a", "b", "c"), per_class=6, size=32)
    write_image_folder(data / "val", classes=("a", "b", "c"), per_class=2, size=32, seed=1)
    spy_dir = tmp_path / "writes"
    spy_dir.mkdir()
    # Record every file write of the training module with the rank that made it.
    launcher = tmp_path / "launch.py"
    launcher.write_text(
        textwrap.dedent(f"""
        import os, sys
        import densenet_efficient.training.checkpoint as t
        from densenet_efficient import cli
        def spy(real, path_arg):
            def wrapped(*args):
                with open(os.path.join({str(spy_dir)!r}, "rank" + os.environ["RANK"]), "a") as f:
                    f.write(f"{{args[path_arg]}}\\n")
                return real(*args)
            return wrapped
        t.atomic_write = spy(t.atomic_write, 0)
        t._save_model_folder = spy(t._save_model_folder, 1)
        from densenet_efficient.models.engine import sync
        gather = sync._all_gather
        def counted(*args):  # one line per synchronised statistics gather
            with open(os.path.join({str(spy_dir)!r}, "gathers" + os.environ["RANK"]), "a") as f:
                f.write("1\\n")
            return gather(*args)
        sync._all_gather = counted
        sys.exit(cli.main(sys.argv[1:]))
    """)
    )
    save = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(launcher),
            "train",
            "--data",
            str(data),
            "--image-size",
            "32",
            "--depth",
            "10",
            "--growth-rate",
            "6",
            "--n-epochs",
            "2",
            "--batch-size",
            "4",
            "--workers",
            "0",
            "--save",
            str(save),
            "--no-progress",
            "--sync-bn",
            "--mode",
            *mode,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    gathers = [len((spy_dir / f"gathers{r}").read_text().splitlines()) for r in (0, 1)]
    assert gathers[0] == gathers[1] > 0  # both ranks synchronised every batch norm, in step
    assert sorted(p.name for p in spy_dir.iterdir() if p.name.startswith("rank")) == ["rank0"]
    writes = (spy_dir / "rank0").read_text().splitlines()
    assert sum(w.endswith("checkpoint.pt") for w in writes) == 2
    assert proc.stdout.count("epoch 2/2:") == 1  # rank-0-only logging
    assert (
        "cpu x 2 processes" in proc.stdout and "imagefolder 32x32: 18 train / 6 valid images" in proc.stdout
    )
    rows = _read_log(save / "log.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert load_checkpoint(save / "checkpoint.pt")["epoch"] == 2


# -- resuming with other settings, damaged checkpoints ----------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A finished 2-epoch tiny run (trained once per module), its CIFAR folder and md5 lists."""
    root = tmp_path_factory.mktemp("finished")
    md5s = write_fake_cifar10(root / "cifar", per_batch=20, test_size=20)
    with pytest.MonkeyPatch.context() as mp:
        point_cifar10_at(mp, md5s)
        train(_tiny(root / "cifar", root / "run", n_epochs=2))
    return root / "cifar", root / "run", md5s


@pytest.fixture
def run_copy(finished_run, tmp_path, monkeypatch) -> Path:
    """A private copy of :func:`finished_run`'s folder."""
    cifar, run, md5s = finished_run
    return _private_copy(run, md5s, tmp_path, monkeypatch)


def test_first_epoch_runs_at_the_given_lr_whatever_the_epoch_count(one_epoch_run):
    # One epoch used to get milestones [0, 0] and run at lr / 100.
    assert [lr_milestones(n)[0] >= 1 for n in range(1, 12)] == [True] * 11
    assert lr_milestones(4) == [2, 3]  # the demo's schedule is unchanged for longer runs
    assert [row["lr"] for row in one_epoch_run[2]] == [0.05]  # a one-epoch run at lr 0.05


def test_resume_with_more_epochs_continues_on_the_recomputed_schedule(finished_run, run_copy, capsys):
    cifar = finished_run[0]
    # The same settings given again (the data folder spelt differently) are not a change.
    same = ("--depth", "10", "--lr", "0.1", "--data", f"{cifar}/../{cifar.name}", "--dataset", "cifar10")
    assert _cli("--save", str(run_copy), "--resume", "--n-epochs", "4", *same, "--no-progress") == 0
    out = capsys.readouterr().out
    assert "resuming with --n-epochs 4 (the run had 2): training continues to epoch 4" in out
    rows = _read_log(run_copy / "log.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]
    # Epochs 1-2 ran on the 2-epoch schedule (x0.01 after epoch 1); epochs 3-4 run where a 4-epoch
    # schedule is (x0.1 after epochs 2 and 3), so the rate goes back up to 0.01 for epoch 3.
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.1, 0.001, 0.01, 0.001])
    ckpt = load_checkpoint(run_copy / "checkpoint.pt")
    assert ckpt["epoch"] == 4 and ckpt["config"]["n_epochs"] == 4

    # Finished: a plain resume says there is nothing to train instead of silently doing nothing.
    assert _cli("--save", str(run_copy), "--resume", "--no-progress") == 0
    assert "already completed its 4 epochs: nothing to train" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--n-epochs", "5", "--lr", "0.5", "--depth", "16", "--dataset", "digits"],
            r"--dataset digits \(the run has auto\); --depth 16 \(the run has 10\); --lr 0.5 \(the run has 0.1\) "
            r"would change its numbers",
        ),
        (["--data", "{tmp}/elsewhere"], r"--data .*elsewhere \(the run has .*cifar\) would change"),
        (["--n-epochs", "2"], None),  # unchanged: accepted
        (["--n-epochs", "1"], "the run has already completed 2 epochs; give more than 2"),
    ],
)
def test_resume_refuses_settings_that_would_change_the_numbers(
    run_copy, tmp_path, capsys, snapshot, argv, message
):
    before = snapshot(run_copy)
    rc = _cli("--save", str(run_copy), "--resume", "--no-progress", *[a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    if message is None:
        assert rc == 0 and err == ""
    else:
        assert rc == 2 and len(err.strip().splitlines()) == 1
        assert re.search(message, err), err
    assert snapshot(run_copy) == before


def _damage(ckpt: dict, what: str) -> str:
    """Break one part of a checkpoint's content; return what the refusal must say."""
    if what == "unknown_setting":
        ckpt["config"]["learning_rate_warmup"] = 5
        return r"settings this version does not know \(learning_rate_warmup\)"
    if what == "other_depth":
        ckpt["config"]["depth"] = 16
        return r"its model does not fit the densenet_bc_16_k6 .*: its tensors hold dense blocks of 1-1-1 layers"
    if what == "missing_weight":
        del ckpt["model"]["classifier.bias"]
        return r"its model does not fit .*: missing keys: classifier.bias$"
    if what == "bad_rng":
        ckpt["rng"]["numpy"] = {"kind": "MT19937"}
        return "its rng state cannot be restored"
    if what == "negative_epoch":
        ckpt["epoch"] = -5
        return r"its epoch is -5, expected a count of completed epochs >= 1"
    if what == "short_history":
        ckpt["history"] = ckpt["history"][:1]
        return r"one row per completed epoch \(2\), found 1"
    if what == "bad_optimizer":
        ckpt["optimizer"]["param_groups"] = []
        return "its optimizer state cannot be restored"
    raise AssertionError(what)


@pytest.mark.parametrize(
    "what",
    [
        "unknown_setting",
        "other_depth",
        "missing_weight",
        "bad_rng",
        "negative_epoch",
        "short_history",
        "bad_optimizer",
    ],
)
def test_resume_refuses_an_inconsistent_checkpoint_in_one_line(run_copy, capsys, snapshot, what):
    path = run_copy / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    message = _damage(ckpt, what)
    torch.save(ckpt, path)
    before = snapshot(run_copy)
    assert _cli("--save", str(run_copy), "--resume", "--n-epochs", "3", "--no-progress") == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"densenet-efficient train: error: checkpoint {path}")
        and len(err.strip().splitlines()) == 1
    )
    assert re.search(message, err), err
    assert snapshot(run_copy) == before


# -- the run folder -------------------------------------------------------------------------------


def test_save_inside_the_image_folder_is_refused(tmp_path, capsys, snapshot):
    data = write_image_folder(tmp_path / "if_good", classes=("a", "b"), per_class=3, size=16)
    before = snapshot(data)
    rc = _cli("--data", str(data), "--image-size", "8", "--save", str(data / "a" / "run"), "--no-progress")
    assert rc == 2
    assert "is inside --data" in capsys.readouterr().err
    assert snapshot(data) == before and not (data / "a" / "run").exists()


@pytest.mark.parametrize("where", ["file", "under_a_file"])
def test_unwritable_save_is_refused_before_any_epoch(cifar, tmp_path, capsys, where):
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"mine")
    save = blocker if where == "file" else blocker / "run"
    assert _cli(*_tiny_argv(cifar, 2, "--save", str(save), "--workers", "0")) == 2
    out, err = capsys.readouterr()
    expected = "is a file; expected a folder" if where == "file" else "cannot write the run folder"
    assert expected in err and len(err.strip().splitlines()) == 1
    assert "epoch 1/" not in out  # refused before spending any training time
    assert blocker.read_bytes() == b"mine"


def test_disk_full_while_saving_is_one_sentence_and_keeps_the_last_checkpoint(cifar, tmp_path, monkeypatch):
    real_save = train_mod.save_epoch

    def disk_full_at_epoch_2(save_dir, trainables, c, epoch, *args):
        if epoch == 2:  # every fsync (each atomic write's) fails as on a full disk
            monkeypatch.setattr(
                os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device"))
            )
        return real_save(save_dir, trainables, c, epoch, *args)

    monkeypatch.setattr(train_mod, "save_epoch", disk_full_at_epoch_2)
    save = tmp_path / "run"
    with pytest.raises(
        UsageError,
        match="could not save epoch 2 in .*: No space left on device; the checkpoint of epoch 1 is kept",
    ):
        train(_tiny(cifar, save))
    monkeypatch.undo()
    assert load_checkpoint(save / "checkpoint.pt")["epoch"] == 1
    assert not list(save.glob(".*tmp*"))


def test_a_last_training_batch_of_one_is_dropped(tmp_path):
    # 2 x 11 images, no validation: 22 = 3 x 7 + 1, and at 4x4 the last block is 1x1, where batch
    # norm cannot normalise a single image.
    data = write_image_folder(tmp_path / "data", classes=("a", "b"), per_class=11, size=8)
    result = train(
        data=str(data), image_size=4, depth=10, growth_rate=6, batch_size=7, valid_size=0, n_epochs=1,
        save=str(tmp_path / "run"), progress=False, workers=0,
    )  # fmt: skip
    assert result.finished and math.isfinite(result.history[0]["train_loss"])


@pytest.mark.parametrize(
    ("options", "folder"),
    [
        ({}, "digits"),  # `densenet-efficient train` with no arguments: named after the data, not "auto"
        ({"data": "cifar"}, "cifar10"),
        ({"data": "cifar", "dataset": "cifar10"}, "cifar10"),
        ({"data": "flowers"}, "flowers"),  # an ImageFolder: its own folder name
        ({"data": "flowers", "dataset": "imagefolder"}, "flowers"),
    ],
)
def test_default_run_folder_is_named_after_the_data_set(tmp_path, monkeypatch, options, folder):
    write_fake_cifar10(tmp_path / "cifar", per_batch=1, test_size=1)
    write_image_folder(tmp_path / "flowers", per_class=1, size=8)
    monkeypatch.chdir(tmp_path)
    _, save_dir, ckpt, _, notices = train_mod._open_run(TrainConfig(**options), frozenset())
    assert (
        re.fullmatch(rf"runs/{folder}-\d{{8}}-\d{{6}}", save_dir.as_posix()) and ckpt is None and not notices
    )
