"""scripts/gpu_check.py: its plumbing on CPU (--quick --device cpu), and its correctness checks on
every device present (CPU always; CUDA when available)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

from densenet_efficient.models.engine import MODES

from ..support import REPO


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_writes_the_report_on_cpu(tmp_path):
    out = tmp_path / "docs" / "gpu_check.md"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--quick", "--device", "cpu", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    for header in (
        "# GPU readiness check",
        "## (a) Correctness on CPU",
        "## (b) Benchmark table",
        "## (c) densenet121",
        "## (d) Planner estimate vs measurement",
        "## (s) Speed: step time, memory and ops per step",
        "## (g) Graphs: the captured step against naive and the compiler",
    ):
        assert header in text
    # (s) runs on the CPU too: every implementation of both quick points, with its op count
    speed = text.split("## (s)")[1]
    assert speed.count("| efficient |") == 2 and "target <= 1.15x" in speed and "target >= 0.95x" in speed
    # (g) runs on the CPU too, with aot_eager: every variant, compile times, the verdicts
    graphs = text.split("## (g)")[1]
    assert graphs.count("| efficient captured |") == 1 and "target < 1.00x" in graphs and "aot_eager" in graphs
    assert text.count("skipped: no CUDA") == 3  # (b), (c), (d) need CUDA; (a) ran on the CPU
    assert f"torch {torch.__version__}" in text and "- Card: none (CPU run)" in text
    assert re.search(r"^(\d+)/\1 rows pass", text, re.M)
    assert text.strip() in proc.stdout  # the same Markdown is printed
    assert not list(out.parent.glob("*.tmp"))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_modes_match_naive_on_every_device(device):
    """(a) of the GPU check: float64 outputs and gradients within 1e-10, fp32 1e-4, bf16 2e-2."""
    gpu_check = _gpu_check()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a busy machine's oversubscription costs more than it gives
    try:
        rows = gpu_check.correctness_rows(device, quick=device == "cpu")
    finally:
        torch.set_num_threads(threads)
    failed = [r for r in rows if not r["passed"]]
    assert not failed, failed
    assert {r["setting"] for r in rows} >= {"torchvision", *MODES}
    assert {r["precision"] for r in rows} == {"float64", "fp32", "bf16 autocast"}
    assert all(
        r["output_rel"] <= 1e-10 and r["grad_rel"] <= 1e-10 for r in rows if r["precision"] == "float64"
    )
