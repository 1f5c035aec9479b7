"""The analytic planner against real measurements (docs/measurement.md protocol), and its user-facing edges."""

from __future__ import annotations

import json
import re
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import densenet_efficient as de
from densenet_efficient.cli import main
from densenet_efficient.errors import UsageError
from densenet_efficient.models.config import densenet_bc_config, resolve_arch
from densenet_efficient.models.memory_plan import MemoryPlan, resolve_memory_plan
from densenet_efficient.models.planner import (
    ESTIMABLE,
    LOWEST_RATIO,
    MemoryBudgetError,
    count_parameters,
    deepest_densenet_bc,
    estimate_memory,
    fit_memory,
    max_batch_size,
    parse_memory,
    plan,
)
from densenet_efficient.models.planner.bisection import first_true, last_true
from densenet_efficient.models.planner.verify import step_down
from densenet_efficient.perf.measure import StepSpec, measure_series

from ..support.archs import ALL_ARCHS

# Two architectures x two batch sizes, every mode: small enough for 2 CPU cores. Each figure is a
# warm step (StepSpec.warmup): the first step's one-time allocations (oneDNN kernel caches, thread
# pools) ranged from ~0 to 56 MB between machines and runs, which is the size of a test config's
# activations; a step after a warm-up repeats to ~1 MB. docs/benchmarks.md has the first-step
# figures (docs/measurement.md) at full size.
CONFIGS = [
    ("densenet_bc_40", 16, 32),
    ("densenet_bc_40", 32, 32),
    ("densenet_bc_100", 16, 32),
    ("densenet_bc_100", 32, 32),
]
MODES = ["naive", "efficient", "max_saving"]
CASES = [(a, b, r, m) for a, b, r in CONFIGS for m in MODES]

# The dial: settings between the modes, each block its own (naive beside the engine, counts of kept
# last layers, a naive block after engine blocks), a stem that recomputes while blocks keep, and
# fit_memory's own pick.
DIAL_CASES = [
    ("densenet_bc_100", 32, 32, (8, 16, 4)),
    ("densenet_bc_100", 32, 32, ("naive", "efficient", "max_saving")),
    ("densenet_bc_100", 32, 32, ("max_saving", 6, "naive")),
    # densenet121's naive block 4 after engine blocks reads 14-17% above the warm estimate (docs/
    # planner.md: memory outside tensors, open under #21); the whole-step GRID below keeps that
    # setting and checks the budget bound with the margin, so here block 4 runs on the engine.
    ("densenet121", 8, 64, ("max_saving", 6, True, "efficient")),
    (
        "densenet121",
        8,
        64,
        MemoryPlan(("efficient", (True, False) * 6, "max_saving", "efficient"), "max_saving"),
    ),
    ("densenet121", 8, 64, "fit 60%"),
]

# The budget promise, small: the planner's total must bound the measured whole step (parameters,
# gradients, momentum, batch, activations; StepSpec(kind="whole_step")) and stay within 10% of it.
# Each point is measured twice in a row and the second, warm figure is compared with the total
# less the first step's one-time allocations: those depend on the CPU and on the kernels a point
# uses first (oneDNN creates its bf16 and per-shape primitives on first use), so a throwaway step
# of another configuration does not pay them (measured: a bf16 point after an fp32 throwaway
# held ~30 MiB more than warm). scripts/planner_grid.py runs the full grid (docs/planner.md).
GRID = [
    ("densenet_bc_40", 32, 32, "naive", None),
    ("densenet_bc_100", 32, 32, "efficient", "bf16"),  # read 1.012 of the old bound on CI
    ("densenet_bc_100", 16, 32, ("max_saving", 6, "naive"), None),
    ("densenet121", 2, 96, ("efficient", "efficient", "efficient", "naive"), None),  # naive after engine
    ("densenet121", 4, 96, "max_saving", "bf16"),
    ("densenet_bc_100", 16, 32, "fit 60%", None),
]


#: The warm figure of a point measured after others in the same process reads low: its build
#: reuses heap memory (tensors under 64 KiB) that earlier points left behind, more so after the same
#: architecture (densenet121 b4 96px bf16 max_saving: 0.976 of the bound alone in its process, 0.87
#: after another densenet121). The upper bound is strict; LOWEST_RATIO holds on the fresh figures
#: of scripts/planner_grid.py (docs/planner.md).
WARM_FLOOR = LOWEST_RATIO - 0.05


def _dial_plan(arch: str, batch: int, res: int, setting, amp=None) -> MemoryPlan:
    config = resolve_arch(arch)
    if setting == "fit 60%":  # fit_memory's pick for a budget 60% of the way from the floor up
        low, high = (
            estimate_memory(config, batch_size=batch, image_size=res, mode=m, device="cpu", amp=amp).total
            for m in ("max_saving", "efficient")
        )
        return fit_memory(
            config, low + (high - low) * 6 // 10, batch_size=batch, image_size=res, device="cpu", amp=amp
        )
    if isinstance(setting, str):
        return resolve_memory_plan(setting, config)
    return resolve_memory_plan(setting if isinstance(setting, MemoryPlan) else list(setting), config)


@pytest.fixture(scope="module")
def measured():
    """Every figure the measured tests read, in three fresh processes (two at a time): the warm
    steps of CASES, those of DIAL_CASES, and the whole steps of GRID. A warm figure resets the peak
    before its step; a whole step reads its own baseline before its model exists, and is measured
    twice: the first pays the one-time allocations of its kernels, the second is the figure."""
    plans = {str(c): _dial_plan(*c) for c in DIAL_CASES}
    grid_plans = {str(g): _dial_plan(g[0], g[1], g[2], g[3], g[4]) for g in GRID}
    warm = [StepSpec(m, resolve_arch(a), b, r, warmup=True) for a, b, r, m in CASES]
    dial = [
        StepSpec(
            "efficient", resolve_arch(c[0]), c[1], c[2], warmup=True, memory_plan=plans[str(c)].to_json()
        )
        for c in DIAL_CASES
    ]
    whole = [
        StepSpec(
            "efficient",
            resolve_arch(g[0]),
            g[1],
            g[2],
            kind="whole_step",
            amp=g[4],
            memory_plan=grid_plans[str(g)].to_json(),
        )  # fmt: skip
        for g in GRID
    ]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(measure_series, [[w for w in whole for _ in (0, 1)], warm, dial]))
    peaks = [[r["peak_bytes"] for r in series] for series in results]
    return {
        "cases": dict(zip(CASES, peaks[1], strict=True)),
        "dial": {str(c): (plans[str(c)], p) for c, p in zip(DIAL_CASES, peaks[2], strict=True)},
        "grid": {str(g): (grid_plans[str(g)], p) for g, p in zip(GRID, peaks[0][1::2], strict=True)},
    }


# One xdist worker runs every test that uses the measurements, so they are made once per run.
@pytest.mark.xdist_group("measured")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-b{c[1]}-{c[2]}px-{c[3]}")
def test_estimate_within_15_percent_of_measured(case, measured):
    arch, batch, res, mode = case
    est = estimate_memory(arch, batch_size=batch, image_size=res, mode=mode, device="cpu")
    got = measured["cases"][case]
    # A warm step has no one-time allocations: the activation + workspace model alone must be
    # within 15% of it (measured 0.2-12% on the 2-core machine).
    core = est.activations + est.workspace
    assert 0.85 * core <= got <= 1.15 * core, (
        f"estimate {core / 2**20:.1f} MB vs measured (warm step) {got / 2**20:.1f} MB"
    )


@pytest.mark.xdist_group("measured")
@pytest.mark.parametrize("case", DIAL_CASES, ids=lambda c: f"{c[0]}-b{c[1]}-{c[2]}px-{c[3]}")
def test_every_dial_setting_within_15_percent_of_measured(case, measured):
    arch, batch, res, _ = case
    plan, got = measured["dial"][str(case)]
    assert plan.mode is None, "a mixed setting"
    est = estimate_memory(arch, batch_size=batch, image_size=res, mode=plan, device="cpu")
    core = est.activations + est.workspace
    assert 0.85 * core <= got <= 1.15 * core, (
        f"{plan}: estimate {core / 2**20:.1f} MB vs measured (warm step) {got / 2**20:.1f} MB"
    )


@pytest.mark.xdist_group("measured")
def test_measured_memory_ordering(measured):
    # the point of the engine: each mode keeps less than the previous
    for arch, batch, res in CONFIGS:
        naive, eff, ms = (measured["cases"][(arch, batch, res, m)] for m in MODES)
        assert naive > eff > ms, (arch, batch, naive, eff, ms)


@pytest.mark.xdist_group("measured")
@pytest.mark.parametrize("point", GRID, ids=lambda g: f"{g[0]}-b{g[1]}-{g[2]}px-{g[3]}-{g[4] or 'fp32'}")
def test_planner_total_bounds_the_measured_whole_step_within_10_percent(point, measured):
    arch, batch, res, _, amp = point
    plan, got = measured["grid"][str(point)]
    est = estimate_memory(arch, batch_size=batch, image_size=res, mode=plan, device="cpu", amp=amp)
    # the point's first measurement paid the one-time allocations the CPU overhead stands for
    bound = est.total - est.overhead
    assert WARM_FLOOR * bound <= got <= bound, (
        f"{plan}: planner {bound / 2**20:.1f} MiB vs measured whole step {got / 2**20:.1f} MiB "
        f"(ratio {got / bound:.3f})"
    )


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_parameter_count_matches_model(arch):
    model = de.create_model(arch)
    assert count_parameters(model.arch_config) == sum(p.numel() for p in model.parameters())


def test_parameter_count_any_depth():
    model = de.densenet_bc(40, growth_rate=24)
    assert count_parameters(densenet_bc_config(40, 24)) == sum(p.numel() for p in model.parameters())


def test_memory_is_affine_in_batch_and_ordered_by_mode():
    ests = {
        m: [estimate_memory("densenet_bc_100", batch_size=b, mode=m).total for b in (8, 16, 24)]
        for m in ESTIMABLE
    }
    for m, (a, b, c) in ests.items():
        assert b - a == c - b > 0, m
    per_image = {m: v[1] - v[0] for m, v in ests.items()}
    assert (
        per_image["max_saving"]
        < per_image["efficient"]
        < per_image["torchvision_efficient"]
        < per_image["naive"]
    )
    assert per_image["naive"] == per_image["torchvision"]


def test_naive_grows_quadratically_efficient_linearly_in_depth():
    def act(depth, mode):
        return estimate_memory(densenet_bc_config(depth), batch_size=8, mode=mode).activations

    # doubling the layers per block: ~4x for naive's concatenations, ~2x for the engine's buffers
    assert act(388, "naive") / act(196, "naive") > 3.3
    assert act(388, "max_saving") / act(196, "max_saving") < 2.3


def test_amp_halves_activations():
    fp32 = estimate_memory("densenet121", batch_size=32, mode="efficient")
    bf16 = estimate_memory("densenet121", batch_size=32, mode="efficient", amp="bf16")
    assert bf16.parameters == fp32.parameters
    assert 0.45 < bf16.activations / fp32.activations < 0.6


def test_max_batch_size_is_the_largest_that_fits():
    budget = parse_memory("4GiB")
    for mode in ("naive", "efficient", "max_saving"):
        n = max_batch_size("densenet121", budget, image_size=224, mode=mode)
        assert estimate_memory("densenet121", batch_size=n, image_size=224, mode=mode).total <= budget
        assert estimate_memory("densenet121", batch_size=n + 1, image_size=224, mode=mode).total > budget


def test_max_batch_size_too_small_budget_names_minimum():
    with pytest.raises(ValueError, match=r"fits no batch.*at least \d"):
        max_batch_size("densenet121", "64MiB", image_size=224)


def test_deepest_densenet_bc_fits_and_next_does_not():
    for mode in ("naive", "efficient"):
        d = deepest_densenet_bc("2GiB", batch_size=16, mode=mode)
        assert estimate_memory(densenet_bc_config(d), batch_size=16, mode=mode).total <= 2 << 30
        assert estimate_memory(densenet_bc_config(d + 6), batch_size=16, mode=mode).total > 2 << 30
    assert deepest_densenet_bc("2GiB", batch_size=16, mode="efficient") > 2 * deepest_densenet_bc(
        "2GiB", batch_size=16, mode="naive"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8GiB", 8 << 30), ("12GB", 12 * 10**9), ("512M", 512 << 20), ("1.5 GiB", 3 << 29), (1024, 1024)],
)
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("bad", ["", "eight GiB", "8 parsecs", "0GB", -5, "1e3GB"])
def test_parse_memory_rejects_nonsense(bad):
    with pytest.raises(ValueError, match="memory budget"):
        parse_memory(bad)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be an integer >= 1, found 0"),
        ({"batch_size": 2, "image_size": 16}, "too small .* at least 29"),
        ({"batch_size": 2, "mode": "fastest"}, "memory_efficient must be"),
        ({"batch_size": 2, "amp": "int8"}, "amp must be"),
        ({"batch_size": 2, "optimizer": "lion"}, "optimizer must be"),
    ],
)
def test_estimate_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        estimate_memory("densenet121", **kwargs)


def test_plan_cli_table(capsys):
    assert (
        main(["plan", "--arch", "densenet121", "--image-size", "224", "--memory", "8GiB", "--amp", "bf16"])
        == 0
    )
    out = capsys.readouterr().out
    for mode in ESTIMABLE:
        assert mode in out
    assert "bf16" in out and "8 GiB" in out


def test_plan_cli_json_matches_api(capsys):
    argv = ["plan", "--depth", "100", "--memory", "12GB", "--mode", "efficient", "--device", "cuda"]
    assert main([*argv, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["mode"] for r in rows] == ["efficient"]
    assert rows[0]["max_batch_size"] == max_batch_size("densenet_bc_100", "12GB", mode="efficient")


@pytest.mark.parametrize("cuda", [False, True])
def test_plan_cli_plans_for_the_machine_and_says_so(cuda, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert main(["plan", "--arch", "densenet121", "--memory", "8GiB", "--mode", "efficient", "--json"]) == 0
    device = "cuda" if cuda else "cpu"
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows[0]["max_batch_size"] == max_batch_size("densenet121", "8GiB", mode="efficient", device=device)
    assert main(["plan", "--arch", "densenet121", "--memory", "8GiB", "--mode", "efficient"]) == 0
    assert f"training on {device}: budget 8 GiB" in capsys.readouterr().out.splitlines()[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--arch", "densenet999", "--memory", "8GiB"], "unknown architecture 'densenet999'"),
        (["--memory", "100MiB"], "fits no batch in any mode.*needs"),
        (["--memory", "lots"], "memory budget must look like"),
        (["--image-size", "-1", "--memory", "8GiB"], "image_size must be an integer >= 1, found -1"),
        (["--image-size", "0", "--memory", "8GiB"], "image_size must be an integer >= 1, found 0"),
        (["--depth", "10", "--growth-rate", "0", "--memory", "8GiB"], "growth_rate must be >= 1, got 0"),
        (["--depth", "41", "--memory", "8GiB"], "6n\\+4"),
    ],
)
def test_plan_cli_errors_exit_2(argv, message, capsys):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


# -- closed form vs per-layer accounting ------------------------------------------------------------


def _reference_timeline(config, mode, n, h, w, e, pe=4):
    """The planner's accounting, one stage per layer (O(layers)): the reference the closed form
    must reproduce exactly."""
    from densenet_efficient.models.planner import timeline as pl

    c, k, bn = config.num_init_features, config.growth_rate, config.bn_size * config.growth_rate
    copy = e if e != pe else 0  # autocast: half-precision weight copies
    stem, (h, w) = pl._stem_stage(config, mode, n, h, w, e, copy)
    stages = [stem]
    for b, layers in enumerate(config.block_config):
        name, s, cf = f"block{b + 1}", n * h * w, c + layers * config.growth_rate
        if mode in ("naive", "torchvision"):
            for i in range(layers):
                cl = c + i * k
                saved = (2 * cl + 2 * bn) * s * e + (cl * bn + 9 * bn * k) * copy
                stages.append(pl.Stage(f"{name}.layer{i + 1}", saved, 0, 2 * cl * s * e))
            stages.append(pl.Stage(f"{name}.output", cf * s * e, cf * s * e, 0))
        elif mode == "torchvision_efficient":
            stages.append(pl.Stage(f"{name}.input", c * s * e, 0, 0))
            for i in range(layers):
                cl = c + i * k
                saved = (2 * bn + k) * s * e + 9 * bn * k * copy
                stages.append(pl.Stage(f"{name}.layer{i + 1}", saved, 0, 4 * cl * s * e))
            stages.append(pl.Stage(f"{name}.output", cf * s * e, 0, 0))
        else:
            kept, grads, pending, per_layer = (bn if mode == "efficient" else 0), 2 * cf * s * e, 0, []
            weights = sum((c + i * k) * bn + 9 * bn * k for i in range(layers)) * copy
            for i in reversed(range(layers)):
                cl = c + i * k
                pending += (2 * cl + cl * bn + 2 * bn + 9 * bn * k) * pe
                temps = max(3 * cl, 2 * cl + 4 * bn)
                back = grads + weights + temps * s * e + pending
                per_layer.append(pl.Stage(f"l{i}", kept * s * e, (2 * cl + bn) * s * e + weights, back))
            end = grads + pending + 2 * weights
            stages += [pl.Stage(f"{name}.buffer", cf * s * e, 0, end), *reversed(per_layer)]
        if b < len(config.block_config) - 1:
            weight = cf * (cf // 2) * copy
            if mode in ("efficient", "max_saving"):
                stages.append(pl.Stage(f"transition{b + 1}", 0, cf * s * e + weight, 2 * cf * s * e + weight))
            else:
                saved = (cf + cf // 2) * s * e + weight
                stages.append(pl.Stage(f"transition{b + 1}", saved, cf * s * e, 2 * cf * s * e))
            c, h, w = cf // 2, h // 2, w // 2
        else:
            classifier = (cf + 1) * config.num_classes
            stages.append(pl.Stage("head", cf * s * e + classifier * copy, 0, 2 * cf * s * e + classifier * pe))
    return stages


def _reference_parameters(config):
    k, bn, c = config.growth_rate, config.bn_size * config.growth_rate, config.num_init_features
    total = 3 * c * (9 if config.small_inputs else 49) + (0 if config.small_inputs else 2 * c)
    for b, layers in enumerate(config.block_config):
        total += sum(2 * (c + i * k) + (c + i * k) * bn + 2 * bn + 9 * bn * k for i in range(layers))
        c += layers * k
        if b < len(config.block_config) - 1:
            total += 2 * c + c * (c // 2)
            c //= 2
    return total + 2 * c + c * config.num_classes + config.num_classes


SMALL_CONFIGS = [
    densenet_bc_config(10),
    densenet_bc_config(28, 5),
    densenet_bc_config(100),
    resolve_arch("densenet121"),
    de.ArchConfig(growth_rate=5, block_config=(1, 3, 2, 7), num_init_features=9, bn_size=3, num_classes=7),
    de.ArchConfig(growth_rate=48, block_config=(30, 1), num_init_features=4, bn_size=1, small_inputs=True),
]


@pytest.mark.parametrize("config", SMALL_CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("mode", ESTIMABLE)
def test_closed_form_equals_the_per_layer_accounting(config, mode):
    from densenet_efficient.models.planner.timeline import peak, timeline

    assert count_parameters(config) == _reference_parameters(config)
    size = 32 if config.small_inputs else 64
    for n, e, pe in [(1, 4, 4), (3, 2, 4), (64, 8, 8), (5, 2, 2)]:
        closed = timeline(config, mode, n, size, size, e, pe)
        reference = _reference_timeline(config, mode, n, size, size, e, pe)
        assert peak(closed) == peak(reference), (n, e, pe)
        assert sum(st.saved for st in closed) == sum(st.saved for st in reference)


def test_absurd_depths_are_answered_at_once():
    """One Python object per layer made depth 1e8 take 23 GB; the closed form needs O(blocks)."""
    import time

    start = time.perf_counter()
    rows = plan(densenet_bc_config(6 * 16_666_666 + 4), "8GiB")
    assert [r["max_batch_size"] for r in rows] == [0] * len(ESTIMABLE)
    assert deepest_densenet_bc("1TB", batch_size=1) > 10_000
    assert time.perf_counter() - start < 5  # measured: ~0.02 s


def test_plan_cli_shows_the_dial_setting_for_a_batch(capsys):
    argv = ["plan", "--arch", "densenet121", "--memory", "1.4GiB", "--amp", "bf16", "--device", "cuda"]
    argv += ["--batch-size", "64"]
    assert main(argv) == 0
    fitted = fit_memory("densenet121", "1.4GiB", batch_size=64, amp="bf16", device="cuda")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"fit_memory at batch 64: {fitted}; planner total ")
    assert main([*argv[:-1], "400", "--json"]) == 0  # batch 400 is below the floor of 1.4 GiB
    fit = json.loads(capsys.readouterr().out)["fit"]
    assert fit["max_batch_size"] == max_batch_size(
        "densenet121", "1.4GiB", mode="max_saving", amp="bf16", device="cuda"
    )
    assert "even in max_saving mode" in fit["error"]


# -- numbers from the input: answered at once, or refused -------------------------------------------


def _fast(call, limit=1.0):
    """``call()``'s result (or the UsageError it raised) and check it came well under ``limit`` s."""
    import time

    start = time.perf_counter()
    try:
        out = call()
    except UsageError as err:
        out = err
    took = time.perf_counter() - start
    assert took < limit, f"took {took:.2f} s"
    return out


@pytest.mark.parametrize(
    "budget",
    ["9" * 400, "9" * 25 + "B", 10**5000, 2**64 + 1, "17179869185GiB", "16385PiB", "1" + "0" * 30],
    ids=["400-nines", "25-nines-B", "5000-digit-int", "2**64+1", "16EiB+1GiB", "16385PiB", "1e30-digits"],
)
def test_budgets_beyond_16_eib_are_refused_at_once(budget):
    err = _fast(lambda: parse_memory(budget), 0.1)
    assert isinstance(err, UsageError) and "at most 16 EiB" in str(err), err
    assert len(str(err)) < 200  # the message does not echo 400 digits


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("16EiB", 2**64),
        ("17179869184GiB", 2**64),
        ("0.1GB", 10**8),  # exact, not float-rounded
        ("0" * 40 + "12GB", 12 * 10**9),  # leading zeros are not digits of size
        ("2.5 PiB", 5 << 49),
    ],
)
def test_parse_memory_is_exact_up_to_16_eib(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("budget", ["100TiB", 2**64, "1PB"])
def test_max_batch_size_answers_huge_budgets_at_once(budget):
    # stepping back one batch at a time took 107 s for 100 TiB; bisection takes O(log batch)
    n = _fast(lambda: max_batch_size("densenet121", budget))
    limit = parse_memory(budget)
    assert (
        estimate_memory("densenet121", batch_size=n).total
        <= limit
        < estimate_memory("densenet121", batch_size=n + 1).total
    )


@pytest.mark.parametrize(
    ("arch", "kwargs"),
    [
        (densenet_bc_config(6 * 10**15 + 4), {"batch_size": 1}),  # was a MemoryError
        (densenet_bc_config(6 * 10**15 + 4), {"batch_size": 1, "budget": "16EiB"}),
        ("densenet121", {"batch_size": 10**30}),
        ("densenet121", {"batch_size": 1, "image_size": 10**9}),
        (densenet_bc_config(6 * 10**6 + 4, 400), {"batch_size": 3}),
    ],
    ids=["depth-6e15", "depth-6e15-16EiB", "batch-1e30", "size-1e9", "wide-deep"],
)
def test_fit_memory_at_extremes_is_answered_at_once(arch, kwargs):
    kwargs = {"budget": "8GiB", **kwargs}
    err = _fast(lambda: fit_memory(arch, kwargs.pop("budget"), **kwargs))
    assert isinstance(err, MemoryBudgetError) and "even in max_saving mode" in str(err), err
    assert err.floor > parse_memory("8GiB")


def test_fit_memory_refuses_a_per_layer_plan_of_millions_of_layers():
    config = densenet_bc_config(6 * 2_000_000 + 4)  # three blocks of 2 million layers
    low, high = (estimate_memory(config, batch_size=1, mode=m).total for m in ("max_saving", "efficient"))
    err = _fast(lambda: fit_memory(config, (low + high) // 2, batch_size=1))
    assert isinstance(err, UsageError) and "one flag per layer" in str(err), err
    # a budget that fits whole blocks in one mode is answered
    assert _fast(lambda: fit_memory(config, high, batch_size=1)).mode == "efficient"


def test_deepest_densenet_bc_at_16_eib_is_answered_at_once():
    d = _fast(lambda: deepest_densenet_bc("16EiB", batch_size=1))
    assert estimate_memory(densenet_bc_config(d), batch_size=1).total <= 2**64
    assert estimate_memory(densenet_bc_config(d + 6), batch_size=1).total > 2**64


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--memory", "9" * 400], "at most 16 EiB"),
        (["--memory", str(10**30)], "at most 16 EiB"),
        (
            ["--depth", str(6 * 10**15 + 4), "--batch-size", "1", "--memory", "8GiB"],
            "fits no batch in any mode",
        ),
        (["--image-size", str(10**12), "--memory", "8GiB"], "fits no batch in any mode"),
        (["--batch-size", "0", "--memory", "8GiB"], "batch_size must be an integer >= 1, found 0"),
    ],
)
def test_plan_cli_extremes_are_one_line_exit_2_at_once(argv, message, capsys):
    assert _fast(lambda: main(["plan", *argv])) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and len(err.strip().splitlines()) == 1, err


def test_plan_cli_100_tib_answers_at_once(capsys):
    argv = ["plan", "--arch", "densenet121", "--memory", "100TiB", "--device", "cuda", "--json"]
    assert _fast(lambda: main(argv)) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows[1]["max_batch_size"] == max_batch_size("densenet121", "100TiB", mode="efficient") > 10**6


def test_bisection_finds_the_boundary_with_log_calls():
    calls = []

    def fits(n):
        calls.append(n)
        return n <= 10**18

    assert last_true(fits, 1) == 10**18 and len(calls) < 130
    assert first_true(lambda i: i >= 7, 0, 7) == 7 and first_true(lambda i: i >= 3, 0, 7) == 3
    assert last_true(lambda n: n <= 5, 2, 9) == 5 and last_true(lambda n: n <= 5, 5, 5) == 5


# -- one name and one default per idea ---------------------------------------------------------------


def test_image_size_is_the_one_name_of_the_input_size():
    """No release has shipped ``resolution``: the planner's functions refuse it as an unknown
    keyword, and an estimate and its JSON carry ``image_size`` only."""
    new = estimate_memory("densenet121", batch_size=4, image_size=160)
    assert new.image_size == 160 and "resolution" not in new.to_dict() and not hasattr(new, "resolution")
    for call in (
        lambda: estimate_memory("densenet121", batch_size=4, resolution=160),
        lambda: max_batch_size("densenet121", "8GiB", resolution=160),
        lambda: fit_memory("densenet121", "2GiB", batch_size=8, resolution=160),
    ):
        with pytest.raises(TypeError, match="resolution"):
            call()


def test_one_optimizer_default_everywhere():
    model = de.densenet121()
    by_method = model.fit_memory("700MiB", batch_size=8, device="cpu")
    by_function = de.fit_memory("densenet121", "700MiB", batch_size=8, device="cpu")
    with_momentum = de.fit_memory("densenet121", "700MiB", batch_size=8, device="cpu", optimizer="momentum")
    assert by_method == by_function == with_momentum
    est = estimate_memory("densenet121", batch_size=8)
    assert est.optimizer_state == est.parameters  # one momentum buffer
    assert estimate_memory("densenet121", batch_size=8, optimizer="sgd").optimizer_state == 0


# -- verify=True -------------------------------------------------------------------------------------


def test_verify_is_cuda_only_and_says_so():
    model = de.densenet_bc(40)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UsageError, match="verify=True.*CUDA"):
        model.fit_memory("2GiB", batch_size=8, device="cpu", verify=True)
    with pytest.raises(UsageError, match="on CUDA.*this model is on cpu"):
        model.fit_memory("2GiB", batch_size=8, device="cuda", verify=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_verify_steps_the_plan_down_while_the_measured_step_is_over():
    low, high = (
        estimate_memory("densenet121", batch_size=16, mode=m).total for m in ("max_saving", "efficient")
    )
    budget = (low + high) // 2

    def fit(b):
        return fit_memory("densenet121", b, batch_size=16, device="cuda")

    unseen = 60 << 20  # what a GPU adds that the planner does not count (fragmentation, cuDNN)
    measured = []

    def measure(plan):
        measured.append(plan)
        return plan.estimated_peak + unseen

    with pytest.warns(UserWarning, match="over the budget of .*planning again for"):
        plan = step_down(fit, measure, budget)
    assert plan.estimated_peak + unseen <= budget < measured[0].estimated_peak + unseen
    assert plan.estimated_extra_time > measured[0].estimated_extra_time  # it recomputes more
    # a step that fits the first time is kept, with no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert step_down(fit, lambda p: p.estimated_peak, budget) == fit(budget)
    # below the floor once the excess is taken off: the error says what was measured
    with pytest.raises(MemoryBudgetError, match="measured .* over the budget"):
        step_down(fit, lambda p: p.estimated_peak + budget - low + 1, budget)
    # an excess as large as the budget leaves nothing to plan for: said, not looped
    with pytest.raises(UsageError, match="no plan measured within"):
        step_down(fit, lambda p: p.estimated_peak + budget, budget)
