"""The three journeys of ``examples/``, run end to end offline with local stand-ins.

* torchvision's weights: a generated legacy-format (2017) densenet121 file with the real file-name
  rule, served from localhost and named in the weights manifest (``manifest_override``);
* the GitHub repository: a fresh copy of this checkout (``copy_checkout``), loaded with ``source="local"``;
* the user's images: an ImageFolder generated in the test.

Each example's ``main(argv)`` runs in-process, exactly as ``python examples/<name>.py ARGS`` would.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import urllib.error
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file

import densenet_efficient as de
from densenet_efficient import cli
from densenet_efficient.errors import UsageError
from densenet_efficient.models import weights as W

from .support import REPO
from .support.fakedata import write_image_folder
from .support.hub_server import (
    copy_checkout,
    legacy_checkpoint,
    manifest_override,
    serve,
    torchvision_from_url,
)

CLASSES = ("daisy", "rose", "tulip")


def run_example(name: str, *argv: Any) -> Any:
    """``python examples/<name>.py ARGV``, in this process; returns what its ``main`` returns."""
    return runpy.run_path(str(REPO / "examples" / f"{name}.py"))["main"]([str(a) for a in argv])


@pytest.fixture
def torchvision_weights(tmp_path, tmp_path_factory, monkeypatch):
    """torchvision's densenet121 file (generated, legacy format) served locally; yields it and its URL."""
    tv_file = legacy_checkpoint("densenet121", tmp_path_factory.getbasetemp() / "tv-files")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with serve(tv_file.parent) as base:
        url = f"{base}/{tv_file.name}"
        monkeypatch.setenv(
            W.MANIFEST_ENV, str(manifest_override(tmp_path / "manifest.json", {"densenet121": url}))
        )
        yield tv_file, url


@pytest.fixture
def checkout(tmp_path) -> Path:
    return copy_checkout(tmp_path / "clone")


@pytest.fixture
def flowers(tmp_path) -> Path:
    data = tmp_path / "flowers"
    write_image_folder(data / "train", classes=CLASSES, per_class=4, size=40)
    write_image_folder(data / "val", classes=CLASSES, per_class=2, size=40, seed=1)
    return data


@pytest.mark.parametrize("weights", [["--weights", "IMAGENET1K_V1"], ["--pretrained"]])
def test_hub_predict_names_the_class_torchvision_names(
    torchvision_weights, checkout, tmp_path, capsys, weights
):
    image = tmp_path / "photo.png"
    Image.fromarray(torch.randint(0, 255, (300, 260, 3), dtype=torch.uint8).numpy()).save(image)
    got = run_example("hub_predict", image, "--repo", checkout, "--source", "local", *weights)
    # torchvision's own model, loading, preprocessing and category names agree on the prediction
    tv_weights = torchvision.models.DenseNet121_Weights.IMAGENET1K_V1
    with torch.no_grad():
        probs = torchvision_from_url(torchvision_weights[1])(
            tv_weights.transforms()(Image.open(image))[None]
        ).softmax(1)
    assert got["category"] == tv_weights.meta["categories"][int(probs.argmax())]
    assert got["probability"] == pytest.approx(float(probs.max()), abs=1e-5)
    assert f"{got['category']}" in capsys.readouterr().out.splitlines()[0]


def test_hub_predict_without_weights_prints_class_indices(checkout, tmp_path, capsys):
    image = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), "red").save(image)
    got = run_example(
        "hub_predict", image, "--repo", checkout, "--source", "local", "--weights", "none", "--top", "2"
    )
    assert got["category"] is None and 0 <= got["index"] < 1000
    assert capsys.readouterr().out.splitlines()[0].endswith(f"class {got['index']}")


def test_finetune_plans_trains_saves_and_reloads(torchvision_weights, checkout, flowers, tmp_path, capsys):
    out = tmp_path / "run"
    args = [flowers, "--memory", "210MiB", "--device", "cpu", "--batch-size", "6", "--image-size", "48"]
    with pytest.warns(UserWarning, match=r"re-initialised classifier\.weight, classifier\.bias"):
        got = run_example(
            "finetune", *args, "--epochs", "1", "--out", out, "--repo", checkout, "--source", "local"
        )
    printed = capsys.readouterr().out
    # the planner: in 210 MiB a step of densenet121 at 48x48 on CPU fits 5 images naive, 15 efficient
    # on one thread (a test worker's), 2 and 7 on two
    assert "chose 'efficient'" in printed and got["mode"] == "efficient"
    assert f"validation accuracy {got['accuracy']:.1%}" in printed and 0 <= got["accuracy"] <= 1
    assert (got["folder"] / "model.safetensors").is_file() and (got["folder"] / "config.json").is_file()
    ours, hub = got["from_pretrained"].state_dict(), got["hub"].state_dict()
    assert ours.keys() == hub.keys() and all(torch.equal(ours[k], hub[k]) for k in ours)
    assert got["hub"].num_classes == len(CLASSES)


def test_finetune_refuses_a_budget_no_mode_fits(flowers, tmp_path):
    with pytest.raises(UsageError, match=r"fits 1MiB in no mode .*; lower --batch-size or --image-size"):
        run_example(
            "finetune",
            flowers,
            "--memory",
            "1MiB",
            "--device",
            "cpu",
            "--out",
            tmp_path / "run",
            "--source",
            "local",
        )


def test_convert_torchvision_round_trips_through_torchvision_us_and_timm(
    torchvision_weights, flowers, tmp_path, capsys
):
    src, url = torchvision_weights
    run = tmp_path / "fine-tuned"
    train = ["train", "--arch", "densenet121", "--data", flowers, "--image-size", "32", "--n-epochs", "1"]
    assert cli.main([str(a) for a in [*train, "--batch-size", "6", "--workers", "0", "--save", run]]) == 0
    diffs = run_example("convert_torchvision", src, tmp_path / "out", "--run", run, "--image-size", 32)
    assert set(diffs) == {"torchvision vs ours", "torchvision vs timm", "run: torchvision vs ours"}
    assert all(d <= 1e-5 for d in diffs.values()), diffs
    printed = capsys.readouterr().out
    assert "max abs difference, torchvision vs timm: " in printed
    exported = torch.load(tmp_path / "out" / "torchvision.pth", weights_only=True)
    tv = torchvision.models.DenseNet(32, (6, 12, 24, 16), 64, num_classes=len(CLASSES))
    tv.load_state_dict(exported)  # what a user leaving with a fine-tuned model does
    # the source file, loaded by torchvision's own path, is what the folder holds
    ref = torchvision_from_url(url)
    converted = torchvision.models.densenet121()
    converted.load_state_dict(load_file(tmp_path / "out" / "hf" / "model.safetensors"))
    assert all(torch.equal(v, converted.state_dict()[k]) for k, v in ref.state_dict().items())


@pytest.mark.parametrize("name", ["hub_predict", "finetune", "convert_torchvision"])
def test_each_example_runs_as_a_script(name):
    """``python examples/<name>.py --help`` in a fresh process: the script entry point and its usage."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, f"examples/{name}.py", "--help"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"usage: {name}.py") and "Journey" in run.stdout


def test_an_example_reports_a_user_error_in_one_line_as_the_cli_does(tmp_path):
    """A bad source is the user's mistake: one line naming it and exit code 2, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "examples/convert_torchvision.py", "no-such.pth", str(tmp_path / "out")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convert_torchvision.py: error: 'no-such.pth'"), run.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["hub_predict", "finetune"])
@pytest.mark.parametrize(
    "raised",
    [
        RuntimeError("It looks like there is no internet connection and the repo could not be found"),
        urllib.error.URLError("[Errno -2] Name or service not known"),
        RuntimeError("a bug in an entrypoint"),  # not the network: keeps its traceback
    ],
)
def test_no_connection_is_one_line_before_any_work(name, raised, monkeypatch, tmp_path, capsys):
    """hub_predict fetches this repository first, and finetune checks that it can before training."""

    def unreachable(*args, **kwargs):
        raise raised

    monkeypatch.setattr(torch.hub, "load", unreachable)
    monkeypatch.setattr(torch.hub, "list", unreachable)
    monkeypatch.setattr(de, "max_batch_size", lambda *a, **k: pytest.fail("planned before the check"))
    main = runpy.run_path(str(REPO / "examples" / f"{name}.py"))["main"]
    run = lambda: main([str(tmp_path / "data")])  # noqa: E731
    if "a bug" in str(raised):
        with pytest.raises(RuntimeError, match="a bug"):
            cli.run_script(f"{name}.py", run)
        return
    assert cli.run_script(f"{name}.py", run) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{name}.py: error: ") and len(err.splitlines()) == 1, err
