"""The native engine (C++ loops) computes what the Python reference engine computes, and is built,
cached and refused the way its docs say."""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import densenet_efficient as de
from densenet_efficient.models.engine import native

from .test_engine import TINY, TINY_IMAGENET, _randomise_bn

ROOT = Path(__file__).resolve().parents[2]


def test_the_suite_runs_the_native_engine():
    """With a compiler (CI has one) the engine's ops run the C++ loops; ``=0`` asks for Python."""
    status = de.engine_status()
    expected = "python" if os.environ.get(native.ENV) == "0" else "native"
    assert status.engine == expected, status
    assert str(status).startswith(expected)


def _run(model: nn.Module, x: torch.Tensor, reference: bool, seed: int = 5, autocast: bool = False):
    """One training step of ``model`` (outputs, input gradient) on the native or the reference engine."""
    ctx = native.reference_engine() if reference else contextlib.nullcontext()
    x = x.clone().requires_grad_()
    with ctx:
        torch.manual_seed(seed)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = model(x)
        torch.manual_seed(seed + 1)
        F.cross_entropy(y.float(), torch.arange(y.shape[0]) % y.shape[1]).backward()
    return y, x.grad


CASES = {
    "efficient": (TINY, "efficient", {}),
    "max_saving": (TINY, "max_saving", {}),
    "dial": (TINY, de.MemoryPlan(((True, False), (False, True, False))), {}),
    "stem_efficient": (TINY_IMAGENET, "efficient", {}),
    "stem_max_saving": (TINY_IMAGENET, "max_saving", {}),
    "dropout": ({**TINY, "drop_rate": 0.3}, "efficient", {}),
    "eval": (TINY_IMAGENET, "efficient", {"eval": True}),
    "cumulative_momentum": (TINY, "efficient", {"momentum": None}),
    "channels_last": (TINY_IMAGENET, "efficient", {"channels_last": True}),
    "bf16_autocast": (TINY_IMAGENET, "max_saving", {"autocast": True}),
}


@pytest.mark.parametrize("case", CASES)
def test_native_equals_the_python_reference(case):
    """Same ATen calls in the same order: outputs and every gradient are bit-identical in float64
    (bf16 autocast: in bf16); running statistics agree to rounding (the native ops return batch
    statistics that their caller blends in with one ``_foreach_lerp_``; the reference's kernels
    blend them in place)."""
    kwargs, mode, opts = CASES[case]
    dtype = torch.float32 if opts.get("autocast") else torch.float64
    ours = de.DenseNet(**kwargs, memory_efficient=mode).to(dtype)
    _randomise_bn(ours)
    for m in ours.modules():
        if isinstance(m, nn.BatchNorm2d) and "momentum" in opts:
            m.momentum = opts["momentum"]
    size = 33 if kwargs is TINY_IMAGENET else 9
    x = torch.randn(3, 3, size, size, dtype=dtype)
    if opts.get("channels_last"):
        ours = ours.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    if opts.get("eval"):
        ours.eval()
    reference = copy.deepcopy(ours)
    for step in range(2):
        y, gx = _run(ours, x, reference=False, seed=step, autocast=opts.get("autocast", False))
        y_ref, gx_ref = _run(reference, x, reference=True, seed=step, autocast=opts.get("autocast", False))
        assert torch.equal(y, y_ref)
        assert torch.equal(gx, gx_ref)
    for (name, p), q in zip(ours.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    for (name, b), c in zip(ours.named_buffers(), reference.buffers(), strict=True):
        if name.endswith("num_batches_tracked"):
            assert torch.equal(b, c), name
        else:
            assert torch.allclose(b, c, rtol=1e-6 if dtype == torch.float32 else 1e-13, atol=0), name


def test_inference_equals_the_python_reference():
    model = de.DenseNet(**TINY_IMAGENET, memory_efficient="efficient").double().eval()
    _randomise_bn(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
        with native.reference_engine():
            ref = model(x)
    assert torch.equal(out, ref)


def _python(code: str, cache: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, native.CACHE_ENV: str(cache), "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=600, cwd=ROOT
    )


STATUS = "import densenet_efficient as de; print(de.engine_status())"


def test_no_compiler_falls_back_to_python_with_one_line(tmp_path):
    """A failed build (here: a compiler that fails) runs the Python engine and says why on one line;
    ``=1`` makes it an error; ``=0`` never builds."""
    fallback = _python(STATUS, tmp_path, CXX="false")
    assert fallback.returncode == 0, fallback.stderr
    assert fallback.stdout.startswith("python engine (the native engine could not be built")
    said = [line for line in fallback.stderr.splitlines() if "could not be built" in line]
    assert len(said) == 1 and said[0].endswith("running the Python engine"), fallback.stderr
    assert not list(tmp_path.rglob("complete"))  # nothing half-built is ever loaded later

    strict = _python(STATUS, tmp_path, CXX="false", **{native.ENV: "1"})
    assert strict.returncode == 1 and "NativeBuildError" in strict.stderr

    off = _python(STATUS, tmp_path / "off", **{native.ENV: "0"})
    assert off.stdout.strip() == f"python engine ({native.ENV}=0)"
    assert not (tmp_path / "off").exists()  # never built

    wrong = _python(STATUS, tmp_path, **{native.ENV: "yes"})
    assert wrong.returncode == 1 and f"{native.ENV} must be 0" in wrong.stderr


def test_two_processes_share_one_build(tmp_path):
    """Started together on an empty cache, two processes build once (one "building" line) and
    both run the native engine; a third finds the build and says nothing."""
    code = STATUS + "; import torch, densenet_efficient.models.engine.ops"
    env = {**os.environ, native.CACHE_ENV: str(tmp_path), "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    assert all(out.startswith("native engine") for out, _ in results), results
    building = sum(err.count("building the native engine") for _, err in results)
    assert building == 1, results
    again = _python(STATUS, tmp_path)
    assert again.stdout.startswith("native engine") and again.stderr == ""


@pytest.mark.parametrize("mode", ["efficient", "max_saving"])
def test_the_meta_device_runs_every_engine_mode(mode):
    """Shape inference and FLOP counting move a model to ``meta``: a training step and inference
    give naive's shapes (the ops run their Python kernels there: some ATen kernels have no meta)."""
    x = torch.randn(2, 3, 32, 32, device="meta")
    shapes = {}
    for setting in ("naive", mode):
        model = de.DenseNet(**TINY_IMAGENET, memory_efficient=setting).to("meta")
        y = model(x)
        y.sum().backward()
        model.eval()
        with torch.no_grad():
            shapes[setting] = (y.shape, model(x).shape, [p.grad.shape for p in model.parameters()])
        assert y.device.type == "meta"
    assert shapes[mode] == shapes["naive"]
