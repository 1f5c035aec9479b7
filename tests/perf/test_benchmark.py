"""The benchmark harness: rows, ratios, tables, sweeps and its command line (tiny configs)."""

from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import re

import pytest

from densenet_efficient.cli import main
from densenet_efficient.errors import UsageError
from densenet_efficient.models.config import ArchConfig
from densenet_efficient.perf.benchmark import (
    benchmark,
    error_notes,
    machine_description,
    row_cells,
    save_sweep,
    sweep,
    to_markdown,
)
from densenet_efficient.perf.measure import MEMORY_ENV, StepSpec, measure

# A tiny CIFAR-style DenseNet: every row of the benchmark in a few seconds.
TINY = ArchConfig(growth_rate=8, block_config=(2, 2), num_init_features=8, num_classes=10, small_inputs=True)


def test_benchmark_rows_and_ratios():
    rows = benchmark(
        TINY,
        batch_size=8,
        image_size=32,
        implementations=["max_saving", "torchvision"],  # the base row need not come first
        rounds=2,
        steps=1,
        device="cpu",
        progress=False,
    )
    assert [r["implementation"] for r in rows] == ["max_saving", "torchvision"]
    ms, tv = rows
    for r in rows:
        assert r["peak_mb"] > 0 and r["seconds"] > 0 and len(r["seconds_rounds"]) == 2
        assert r["seconds"] == pytest.approx(sum(r["seconds_rounds"]) / 2)  # median of two rounds
        assert r["memory_ratio"] == pytest.approx(r["peak_mb"] / tv["peak_mb"])
        # paired by round: the median (here the mean) of the per-round ratios, and their range
        paired = [a / b for a, b in zip(r["seconds_rounds"], tv["seconds_rounds"], strict=True)]
        assert r["time_ratio"] == pytest.approx(sum(paired) / 2)
        assert r["time_ratio_range"] == [min(paired), max(paired)]
        assert r["estimate_mb"] > 0
    assert ms["estimate_mb"] < tv["estimate_mb"]
    # ops/step: counted for every eager row (a tiny 2-layer block is all per-block overhead, so no
    # ordering here: tests/perf/test_opcount.py compares full-size models)
    assert ms["ops_per_step"] > 0 and tv["ops_per_step"] > 0
    table = to_markdown(rows)
    assert f"| {tv['ops_per_step']} |" in table
    assert table.count("\n") == 3 and "| max_saving |" in table and "1.000x" in table
    lo, hi = ms["time_ratio_range"]
    assert f"{ms['time_ratio']:.3f}x ({lo:.2f}-{hi:.2f})" in table


def test_benchmark_memory_only_and_bad_input():
    rows = benchmark(
        TINY, batch_size=4, image_size=16, implementations=["efficient"], speed=False, progress=False
    )
    assert rows[0]["memory_ratio"] is None and "seconds" not in rows[0]  # no torchvision row to compare with
    with pytest.raises(ValueError, match="unknown implementation 'fast'"):
        benchmark(TINY, implementations=["fast"], progress=False)
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        benchmark(TINY, batch_size=0, progress=False)
    # 0 is refused, not read as "the default" (the Python API is checked, not only the CLI)
    with pytest.raises(ValueError, match="image_size must be an integer >= 1, found 0"):
        benchmark(TINY, image_size=0, device="cpu", progress=False)
    with pytest.raises(ValueError, match="image_size 2 is too small"):
        sweep("depth", values=[10], image_size=2, device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"threads must be an integer >= 1, found 0"):
        benchmark(TINY, threads=0, device="cpu", progress=False)


def test_depth_sweep_writes_csv_and_png(tmp_path):
    rows = sweep(
        "depth",
        values=[10, 22],
        batch_size=4,
        image_size=16,
        implementations=["naive", "max_saving"],
        progress=False,
    )
    csv_path, png_path = save_sweep(rows, "depth", tmp_path, "test")
    with open(csv_path) as f:
        data = list(csv.DictReader(f))
    assert [(int(r["depth"]), r["implementation"]) for r in data] == [
        (10, "naive"),
        (10, "max_saving"),
        (22, "naive"),
        (22, "max_saving"),
    ]
    mem = {(int(r["depth"]), r["implementation"]): float(r["peak_mb"]) for r in data}
    assert mem[(22, "naive")] > mem[(10, "naive")]
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--arch", "resnet50"], "unknown architecture 'resnet50'"),
        (["--depth", "11"], "6n\\+4"),
        (["--batch-size", "0", "--depth", "10"], "must be an integer >= 1"),
        (["--sweep", "width"], None),  # argparse rejects the choice
        (
            ["--depth", "10", "--image-size", "2"],
            "image_size 2 is too small for densenet_bc_10: .* at least 4x4",
        ),
        (["--arch", "densenet121", "--image-size", "16"], "image_size 16 is too small for densenet121"),
        (["--depth", "10", "--image-size", "0"], "image_size must be an integer >= 1, found 0"),
        (["--depth", "10", "--growth-rate", "0"], "growth_rate must be >= 1, got 0"),
        (["--sweep", "depth", "--values", "10", "--growth-rate", "0"], "growth_rate must be >= 1, got 0"),
        (["--sweep", "batch", "--image-size", "16"], "image_size 16 is too small for densenet121"),
        (["--device", "cuda"], "CUDA is not available here"),
        (
            ["--depth", "10", "--compiled-budgets", "1.5"],
            r"activation budget must be a number in \(0, 1\], got 1.5",
        ),
        (["--depth", "10", "--compiled-budgets", "0.5", "0"], r"activation budget .*, got 0.0"),
        (["--depth", "10", "--compiled-budgets", "x"], None),  # argparse: not a float
        (["--depth", "10", "--no-compiled", "--compiled-budgets", "0.5"], None),  # mutually exclusive
        (["--depth", "10", "--compile-ours", "fast"], None),  # argparse rejects the choice
        (["--sweep", "depth", "--compiled-budgets", "0.5"], "--sweep does not take them"),
    ],
)
def test_benchmark_cli_errors_exit_2(argv, message, capsys, monkeypatch):
    import torch

    import densenet_efficient.perf.benchmark as bench

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def no_measuring(spec):  # every refusal comes before a measuring process is started
        raise AssertionError(f"measured {spec}")

    monkeypatch.setattr(bench, "measure", no_measuring)
    if message is None:
        with pytest.raises(SystemExit) as exc:
            main(["benchmark", *argv])
        assert exc.value.code == 2
        return
    assert main(["benchmark", *argv]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    ("extra", "budgets"),
    [
        ([], []),  # the default: eager rows only, minutes not hours on a CPU
        (["--compiled-budgets"], [1.0, 0.5, 0.3, 0.1]),  # the flag alone: the default sweep
        (["--compiled-budgets", "0.3"], [0.3]),
        (["--no-compiled"], []),
    ],
)
def test_benchmark_cli_compiles_only_when_asked(extra, budgets, capsys, monkeypatch):
    import densenet_efficient.perf.benchmark as bench

    def first_process(spec):
        raise UsageError("stop here")  # the announcement and the first row's spec are all this test wants

    monkeypatch.setattr(bench, "measure", first_process)
    assert main(["benchmark", "--depth", "10", "--device", "cpu", *extra]) == 2
    announced = capsys.readouterr().err.splitlines()[0]  # said before any process starts
    rows = 5 + len(budgets)
    assert announced.startswith(f"benchmark: {rows} rows, {rows * 2} fresh processes (memory, then 1 speed round)")
    assert ("compiled rows take minutes" in announced) == bool(budgets)


def test_sweep_without_matplotlib_refuses_before_measuring(capsys, monkeypatch):
    import densenet_efficient.errors as errors
    import densenet_efficient.perf.benchmark as bench

    real = errors.importlib.util.find_spec
    monkeypatch.setattr(
        errors.importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a)
    )
    monkeypatch.setattr(bench, "measure", lambda spec: pytest.fail(f"measured {spec} first"))
    assert main(["benchmark", "--sweep", "depth", "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "densenet-efficient benchmark: error: benchmark --sweep (its PNG) needs matplotlib, which is "
        'not installed: pip install "matplotlib>=3.5" (or the package\'s [plot] extra)'
    )


def test_benchmark_cli_json(capsys):
    argv = ["benchmark", "--depth", "10", "--batch-size", "4", "--image-size", "16", "--device", "cpu"]
    argv += ["--no-compiled"]  # the default now; still accepted from old command lines
    assert main([*argv, "--modes", "torchvision", "efficient", "--no-speed", "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["machine"] == machine_description("cpu")
    assert re.fullmatch(r"\d+-core CPU \S+, \d+ threads \(torch \S+, (native|python) engine\)", out["machine"]), out["machine"]
    assert [r["implementation"] for r in out["rows"]] == ["torchvision", "efficient"]
    assert all(r["batch_size"] == 4 and r["image_size"] == 16 and "peak_mb" in r for r in out["rows"])


# --- the compiled peer: torch.compile(torchvision) with activation_memory_budget -----------------


#: The smallest DenseNet worth compiling: inductor compiles a C++ kernel per fused op, so one
#: layer in one block is what makes the compiled peer's test affordable (batch 16: enough
#: activations that the peak RSS moves over the step).
ONE_LAYER = ArchConfig(growth_rate=4, block_config=(1,), num_init_features=4, num_classes=3, small_inputs=True)


def test_compiled_peer_is_measured_warm(monkeypatch):
    """Really compiles (inductor, CPU) a one-layer DenseNet with budget 0.5: memory and speed.

    The suite's slowest test on a fresh machine, by design: each figure is its own fresh process
    (the protocol), so each compiles. With inductor's on-disk cache empty (CI) the first compile
    takes about a minute on one core (TINY: 1.6x that); the second finds the first's kernels in
    the cache and only traces again (~15 s). One compile worker: on a 2-core machine running
    two test workers, a pool of compile processes only adds their start-up.
    """
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "1")  # measure() passes the environment on
    for name in MEMORY_ENV:
        monkeypatch.setenv(name, "1")
    spec = StepSpec("torchvision", ONE_LAYER, 16, 32, compile=True, activation_budget=0.5, steps=1)
    mem = measure(spec)
    assert mem["peak_bytes"] > 0 and mem["compile_seconds"] > 0
    assert mem["spec"]["compile"] is True and mem["spec"]["activation_budget"] == 0.5
    fast = measure(dataclasses.replace(spec, kind="speed"))
    assert fast["seconds"] > 0 and len(fast["times"]) == 1
    # the allocator settings of a memory figure (MEMORY_ENV) slow allocation: never in a timing,
    # even when this process has them
    assert mem["environment"] == MEMORY_ENV
    assert fast["environment"] == dict.fromkeys(MEMORY_ENV)


@pytest.mark.parametrize("budget", [0, 1.5, "x", -0.1, float("nan"), True, None])
def test_bad_budget_is_refused_before_anything_runs(budget, monkeypatch):
    import densenet_efficient.perf.benchmark as bench

    def no_measuring(spec):
        raise AssertionError(f"measured {spec}")

    monkeypatch.setattr(bench, "measure", no_measuring)
    with pytest.raises(UsageError, match=re.escape(f"got {budget!r}")):
        benchmark(
            TINY, batch_size=2, image_size=32, device="cpu", compiled_budgets=[0.5, budget], progress=False
        )
    with pytest.raises(UsageError, match="unknown mode 'fast'"):
        benchmark(TINY, device="cpu", compile_ours=["efficient", "fast"], progress=False)
    with pytest.raises(UsageError, match="needs compile=True"):
        StepSpec("torchvision", TINY, 2, 32, activation_budget=0.5)
    if budget is not None:  # None is "no budget" for a StepSpec
        with pytest.raises(UsageError, match=re.escape(f"got {budget!r}")):
            StepSpec("torchvision", TINY, 2, 32, compile=True, activation_budget=budget)


def test_step_spec_has_one_name_per_field():
    """``image_size`` and ``activation_budget`` (a fraction, not the planner's bytes) are the only
    names: the old ``resolution``/``memory_budget`` are unknown keywords, and the JSON a spec
    writes reads back to the same spec."""
    spec = StepSpec("torchvision", TINY, 2, image_size=16, compile=True, activation_budget=0.5)
    for old in ({"resolution": 16}, {"memory_budget": 0.5}):
        with pytest.raises(TypeError, match=f"unexpected keyword argument '{next(iter(old))}'"):
            StepSpec("torchvision", TINY, 2, 16, compile=True, **old)
    assert not hasattr(spec, "resolution") and not hasattr(spec, "memory_budget")
    assert StepSpec.from_json(spec.to_json()) == spec
    assert dataclasses.replace(spec, kind="speed").image_size == 16


def _fake_eager_figures(spec) -> dict:
    """What a measuring process returns for an eager row, without one (the real processes are
    test_benchmark_rows_and_ratios' job): memory grows with the batch, speed is a fixed time."""
    return {"peak_bytes": spec.batch_size << 20} if spec.kind == "memory" else {"seconds": 0.25}


def test_failed_compilation_is_recorded_on_its_row(monkeypatch, capsys):
    import densenet_efficient.perf.benchmark as bench

    asked = []

    def compile_fails(spec):
        asked.append((spec.impl, spec.kind, spec.compile, spec.activation_budget))
        if spec.compile:
            raise RuntimeError("torch.compile failed: InductorError: no working C++ compiler found")
        return _fake_eager_figures(spec)

    monkeypatch.setattr(bench, "measure", compile_fails)
    rows = benchmark(
        TINY,
        batch_size=2,
        image_size=32,
        implementations=["torchvision"],
        compiled_budgets=[1, 0.3],
        compile_ours=["efficient"],
        rounds=1,
        steps=1,
        device="cpu",
        progress=False,
    )
    labels = ["torchvision", "torchvision compiled (budget 1.0)", "torchvision compiled (budget 0.3)"]
    assert [r["implementation"] for r in rows] == [*labels, "efficient compiled"]
    tv, *compiled = rows
    # the eager row is still measured and recorded, its figures as the (fake) process returned them
    assert tv["peak_mb"] == 2 and tv["seconds"] == 0.25 and tv["memory_ratio"] == 1 and "error" not in tv
    for r in compiled:
        assert r["error"] == "torch.compile failed: InductorError: no working C++ compiler found"
        assert r["peak_mb"] is None and r["seconds"] is None and r["memory_ratio"] is None
        assert r["estimate_mb"] is None and r["time_ratio"] is None
        assert row_cells(r)[1:] == ["-"] * 6  # no op count for compiled rows either
    # a failed compilation is not retried in the speed round; the eager row is timed
    assert asked.count(("torchvision", "speed", False, None)) == 1
    assert [a for a in asked if a[2]] == [
        ("torchvision", "memory", True, 1.0),
        ("torchvision", "memory", True, 0.3),
        ("efficient", "memory", True, None),
    ]
    assert error_notes(rows)[0] == f"{labels[1]}: {compiled[0]['error']}"
    assert len(error_notes(rows)) == 3

    # the command line: "-" cells, and the error printed under the table
    argv = ["benchmark", "--depth", "10", "--batch-size", "2", "--device", "cpu", "--modes", "torchvision"]
    assert main([*argv, "--compiled-budgets", "0.3", "--no-speed", "--quiet", "--markdown"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-2].startswith("| torchvision compiled (budget 0.3) | - | - | - | - | - |")
    assert out[-1] == "torchvision compiled (budget 0.3): " + compiled[0]["error"]


def test_compile_failure_reaches_the_row_as_one_line(monkeypatch):
    """The worker's ERROR line becomes measure()'s message; the compiling step's failure is one line."""
    import subprocess

    m = importlib.import_module("densenet_efficient.perf.measure")  # perf.measure is also the function

    def fake_run(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1, "ERROR torch.compile failed: X: y\n", "long\ntraceback\n")

    monkeypatch.setattr(m.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError) as exc:
        measure(StepSpec("torchvision", TINY, 2, 32, compile=True))
    assert str(exc.value) == "torch.compile failed: X: y"

    def step():
        raise RuntimeError("\ninductor: no compiler\nsecond line")

    with pytest.raises(
        m._CompileFailed, match=r"^torch.compile failed: RuntimeError: inductor: no compiler$"
    ):
        m._compile_step(step)
