"""torch.hub: entrypoints, docstrings, lazy imports, and pretrained loading through ``torch.hub.load``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import densenet_efficient as de
from densenet_efficient.models import weights as W
from densenet_efficient.models.hub import HUB_REPO

from .support import REPO
from .support.hub_server import (
    copy_checkout,
    legacy_checkpoint,
    manifest_override,
    serve,
    torchvision_from_url,
)

#: every registered model, and the two entrypoints that take no registered name
ENTRYPOINTS = sorted([*de.list_models(), "densenet_bc", "from_pretrained"])
GITHUB = f"{HUB_REPO}:main"


def _github_checkout(torch_home: Path, ref: str = "main") -> Path:
    """Put this repo where torch.hub caches a GitHub checkout of ``HUB_REPO`` at ``ref``, so the real
    list/help/load code runs offline."""
    return copy_checkout(torch_home / "hub" / f"{HUB_REPO.replace('/', '_')}_{ref}")


def test_the_hub_path_is_this_projects_repository_everywhere_it_is_shown(tmp_path, monkeypatch):
    """README.md and hubconf.py quote ``HUB_REPO`` (with a tag-pinning example), never the upstream
    repository, which has no hubconf.py; a pinned tag loads through torch.hub's own cache layout."""
    for shown in (REPO / "README.md", REPO / "hubconf.py"):
        text = shown.read_text(encoding="utf-8")
        assert f'torch.hub.load("{HUB_REPO}", ' in text and f'"{HUB_REPO}:v0.1.0"' in text, shown
        assert "gpleiss/efficient_densenet_pytorch" not in text, shown
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _github_checkout(tmp_path, ref="v0.1.0")
    model = torch.hub.load(f"{HUB_REPO}:v0.1.0", "densenet_bc", depth=10, trust_repo=True, verbose=False)
    assert model.arch_config == de.densenet_bc(10).arch_config


def test_list_shows_only_the_entrypoints(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _github_checkout(tmp_path)
    assert sorted(torch.hub.list(GITHUB, trust_repo=True, verbose=False)) == ENTRYPOINTS


@pytest.mark.parametrize("name", ENTRYPOINTS)
def test_every_entrypoint_is_documented(tmp_path, monkeypatch, name):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _github_checkout(tmp_path)
    doc = torch.hub.help(GITHUB, name, trust_repo=True)
    assert doc and "Example::" in doc and f'"{name}"' in doc


def test_hubconf_imports_nothing_until_an_entrypoint_runs(tmp_path):
    """torch.hub.list in a fresh process: the package (and safetensors) stay unimported."""
    _github_checkout(tmp_path)
    script = f"""
import sys, torch
names = torch.hub.list({GITHUB!r}, trust_repo=True, verbose=False)
print(sorted(names) == {ENTRYPOINTS!r}, "densenet_efficient" in sys.modules, "safetensors" in sys.modules)
model = torch.hub.load({GITHUB!r}, "densenet_bc", depth=10, trust_repo=True, verbose=False)
print(type(model).__name__, "densenet_efficient" in sys.modules, "safetensors" in sys.modules)
"""
    env = {"PATH": "/usr/bin:/bin", "TORCH_HOME": str(tmp_path), "HOME": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "True False False",
        "DenseNet True False",
    ]


def test_dependencies_are_declared_and_importable():
    import importlib.util
    import runpy

    deps = runpy.run_path(str(REPO / "hubconf.py"))["dependencies"]
    assert deps[:2] == ["torch", "torchvision"] and "huggingface_hub" in deps
    assert all(importlib.util.find_spec(d) is not None for d in deps)


def test_local_load_builds_every_architecture_family():
    bc = torch.hub.load(
        str(REPO), "densenet_bc", source="local", depth=16, growth_rate=6, memory_efficient="max_saving"
    )
    assert (
        bc.arch_config == de.densenet_bc(16, growth_rate=6).arch_config
        and bc.memory_efficient == "max_saving"
    )
    assert torch.hub.load(str(REPO), "densenet_bc_100", source="local").arch_config.block_config == (
        16,
        16,
        16,
    )
    with pytest.raises(de.WeightsNotAvailableError, match="densenet-efficient train"):
        torch.hub.load(str(REPO), "densenet_bc_100", source="local", pretrained=True)


def test_local_load_pretrained_equals_torchvision(tmp_path, tmp_path_factory, monkeypatch):
    tv_file = legacy_checkpoint("densenet121", tmp_path_factory.getbasetemp() / "tv-files")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with serve(tv_file.parent) as base:
        manifest = manifest_override(tmp_path / "manifest.json", {"densenet121": f"{base}/{tv_file.name}"})
        monkeypatch.setenv(W.MANIFEST_ENV, str(manifest))
        model = torch.hub.load(str(REPO), "densenet121", source="local", pretrained=True, progress=False)
        ref = torchvision_from_url(f"{base}/{tv_file.name}")  # torchvision's own loading path
    assert (tmp_path / "torch_home" / "hub" / "checkpoints" / tv_file.name).is_file()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), ref(x))
