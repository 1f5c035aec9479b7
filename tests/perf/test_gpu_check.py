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
    sys.modules[spec.name] = module  # importlib's recipe: its dataclasses look their module up there
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
    assert (
        graphs.count("| efficient captured |") == 1 and "target < 1.00x" in graphs and "aot_eager" in graphs
    )
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


def test_sections_run_in_table_order_and_deferred_parts_last(monkeypatch):
    """The driver is the table: each section once, in order; skipped without CUDA or when not asked;
    a deferred part ((b)'s compiled rows) after every other section; a failure in its place."""
    gpu_check = _gpu_check()
    order: list[str] = []

    def section(letter: str, defer: bool = False, fail: bool = False):
        def run(run):
            order.append(letter)
            if fail:
                raise RuntimeError("broken\nsecond line")
            if defer:
                return lambda: order.append(f"{letter} finished") or f"{letter} text"
            return f"{letter} text"

        return run

    S = gpu_check.Section
    monkeypatch.setattr(gpu_check, "SECTIONS", (
        S("a", lambda r: "A", section("a"), needs_cuda=False),
        S("b", lambda r: "B", section("b", defer=True), needs_cuda=False),
        S("c", lambda r: "C", section("c"), needs_cuda=True),
        S("d", lambda r: "D", section("d", fail=True), needs_cuda=False),
        S("e", lambda r: "E", section("e"), needs_cuda=False),
    ))  # fmt: skip
    run = gpu_check.Run("cpu", quick=True, deadline=0.0)
    texts = gpu_check.run_sections(run, "abcd")
    assert order == ["a", "b", "d", "b finished"]
    assert texts == {
        "a": "a text",
        "b": "b text",
        "c": "skipped: no CUDA (this run used the CPU)",
        "d": "**Section failed:** `RuntimeError: broken`",
        "e": "not run (--sections)",
    }
    doc = gpu_check.report(run, texts, ["--quick"], 1.0)
    assert doc.index("## (a) A") < doc.index("## (b) B\n\nb text") < doc.index("## (e) E")
