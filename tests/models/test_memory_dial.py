"""The memory dial: per-block and per-layer settings compute exactly the naive model, the planner
models them, and ``fit_memory`` picks the cheapest setting that fits a budget."""

from __future__ import annotations

import itertools

import pytest
import torch

import densenet_efficient as de
from densenet_efficient.errors import UsageError
from densenet_efficient.models.config import ArchConfig, get_config
from densenet_efficient.models.memory_plan import MemoryPlan, resolve_memory_plan
from densenet_efficient.models.planner import (
    MemoryBudgetError,
    estimate_memory,
    extra_time,
    fit_memory,
    max_batch_size,
    parse_memory,
)
from densenet_efficient.models.planner.search import FIT_SHARE

from .test_engine import TINY, TINY_IMAGENET, _assert_same_state, _rel, _train_steps, _twins

# (config kwargs, input size, settings): naive blocks beside engine blocks, counts of kept last
# layers, per-layer flags in no particular pattern, and stems that differ from the blocks.
MIXED = [
    (TINY, 9, ["naive", "max_saving"]),
    (TINY, 9, [1, ("efficient")]),
    (TINY, 9, [(True, False), (False, True, False)]),
    (TINY_IMAGENET, 33, ["max_saving", 1, "naive", True]),
    (TINY_IMAGENET, 33, MemoryPlan(("naive", "efficient", (False, True), "max_saving"), "max_saving")),
    (TINY_IMAGENET, 33, MemoryPlan(("efficient", "max_saving", "naive", (True, False)), "naive")),
    (TINY_IMAGENET, 33, MemoryPlan(("naive",) * 4, "efficient")),
]


@pytest.mark.parametrize(
    "kwargs,size,setting", MIXED, ids=lambda v: str(v)[:40] if not isinstance(v, int) else None
)
def test_mixed_settings_match_naive_float64(kwargs, size, setting):
    naive, dial = _twins(setting, **kwargs)
    ya, yb, ga, gb = _train_steps(naive, dial, size)
    assert _rel(yb, ya) < 1e-9
    assert _rel(gb, ga) < 1e-9
    _assert_same_state(naive, dial)
    naive.eval(), dial.eval()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    assert _rel(dial(x), naive(x)) < 1e-12


def test_full_size_arch_with_a_fitted_plan_matches_naive():
    cfg = get_config("densenet121")
    model = de.DenseNet(**cfg.to_kwargs())
    plan = model.fit_memory("755MiB", batch_size=16, image_size=224)
    assert plan.mode is None, "a budget between the modes gives a mixed plan"
    naive, dial = _twins(plan, **cfg.to_kwargs())
    ya, yb, ga, gb = _train_steps(naive, dial, 64, steps=1)
    assert _rel(yb, ya) < 1e-9 and _rel(gb, ga) < 1e-9
    _assert_same_state(naive, dial)


def test_memory_efficient_reports_a_mode_or_the_plan():
    model = de.DenseNet(**TINY_IMAGENET, memory_efficient=["max_saving"] * 4)
    assert model.memory_efficient == "max_saving"  # every block and the stem agree
    model.set_memory_efficient([2, 0, "naive", True])
    plan = model.memory_efficient
    assert isinstance(plan, MemoryPlan) and plan is model.memory_plan
    assert plan.settings() == {
        "stem": "efficient",
        "block1": "efficient",
        "block2": "max_saving",
        "block3": "naive",
        "block4": "efficient",
    }
    # the one form the engine runs, derived once: per block its layers' keep flags or None (naive)
    assert [getattr(model.features, f"denseblock{i}").keep for i in (1, 2, 3, 4)] == [(True, True), (False, False), None, (True, True)]
    assert model.features.transition3.keep is False  # the engine's transition (keeps only its input)
    model.set_memory_efficient(False)
    assert model.memory_efficient == "naive"
    assert model.features.transition1.keep is None and model.features.denseblock1.keep is None
    # timm's switch leaves a memory-saving plan alone and turns naive into the engine
    model.set_memory_efficient([1, 0, "naive", True]).set_grad_checkpointing(True)
    assert isinstance(model.memory_efficient, MemoryPlan)
    model.set_grad_checkpointing(False)
    assert model.memory_efficient == "naive"


def test_plan_round_trips_through_json():
    cfg = get_config("densenet121")
    plan = fit_memory(cfg, "755MiB", batch_size=16, device="cpu")
    again = MemoryPlan.from_json(plan.to_json())
    assert again == plan
    assert resolve_memory_plan(again, cfg) == plan


@pytest.mark.parametrize(
    "setting,message",
    [
        (["naive"], "has 1 block settings, but this DenseNet has 2 dense blocks (2-3 layers)"),
        (
            [3, 0],
            "block 1 (2 layers): an int setting is how many of its last layers keep their bottleneck, 0..2; got 3",
        ),
        ([-1, 0], "0..2; got -1"),
        ([(True,), 0], "block 1 (2 layers): expected 2 per-layer flags, got 1"),
        ([1.5, 0], "block 1 (2 layers): expected a mode"),
        (["fast", 0], "block 1 (2 layers): memory_efficient must be"),
        ({"block1": 1}, "one setting per dense block, or a MemoryPlan; got dict"),
        (MemoryPlan(("naive", "naive"), "sometimes"), "MemoryPlan.stem must be one of"),
    ],
)
def test_bad_settings_say_what_was_expected(setting, message):
    with pytest.raises(UsageError) as err:
        de.DenseNet(**TINY, memory_efficient=setting)
    assert message in str(err.value)


def test_every_point_between_naive_and_max_saving_is_reachable():
    """Dropping bottlenecks one layer at a time walks the estimate down in small steps."""
    cfg = get_config("densenet_bc_100")
    peaks = [
        estimate_memory(cfg, batch_size=64, mode=[n, 16, 16], device="cpu").peak for n in range(16, -1, -1)
    ]
    assert all(b <= a for a, b in itertools.pairwise(peaks))
    naive = estimate_memory(cfg, batch_size=64, mode="naive", device="cpu").peak
    eff = estimate_memory(cfg, batch_size=64, mode="efficient", device="cpu").peak
    floor = estimate_memory(cfg, batch_size=64, mode="max_saving", device="cpu").peak
    assert naive > eff > floor
    # naive blocks give the points between efficient and naive
    assert eff < estimate_memory(cfg, batch_size=64, mode=["naive", True, True], device="cpu").peak < naive


def test_extra_time_counts_recomputed_bottlenecks():
    cfg = get_config("densenet121")
    assert extra_time(cfg, MemoryPlan.uniform("efficient", 4), 224) == 0.0
    assert extra_time(cfg, MemoryPlan.uniform("naive", 4), 224) == 0.0
    full = extra_time(cfg, MemoryPlan.uniform("max_saving", 4), 224)
    half = extra_time(cfg, resolve_memory_plan([3, 6, 12, 8], cfg), 224)
    assert 0 < half < full < 0.25
    # the last (widest) layers cost more to recompute than the first
    first = extra_time(cfg, resolve_memory_plan([(False,) + (True,) * 5, 12, 24, 16], cfg), 224)
    last = extra_time(cfg, resolve_memory_plan([(True,) * 5 + (False,), 12, 24, 16], cfg), 224)
    assert 0 < first < last


SEARCH_CONFIGS = [  # small enough to simulate every combination (each one a whole step)
    ArchConfig(4, (2, 3, 2), 8, 4, 5, True, 3),
    ArchConfig(8, (2, 1, 2, 1), 16, 4, 5, False, 3),
]


@pytest.mark.parametrize("config", SEARCH_CONFIGS, ids=lambda c: "-".join(map(str, c.block_config)))
def test_fit_memory_is_the_cheapest_setting_that_fits(config):
    """Against every combination of kept last layers per block and stem, each simulated whole:
    nothing that fits the share of the budget fit_memory plans for recomputes less than what it
    picked (its search composes two simulations), and what it picked fits."""
    res = 32 if config.small_inputs else 64
    stems = ("efficient",) if config.small_inputs else ("efficient", "max_saving")
    every = []
    for keeps in itertools.product(*(range(n + 1) for n in config.block_config)):
        for stem in stems:
            plan = MemoryPlan(resolve_memory_plan(list(keeps), config).blocks, stem)
            est = estimate_memory(config, batch_size=4, image_size=res, mode=plan, device="cpu")
            every.append((est.total, est.extra_time))
    low, high = min(t for t, _ in every), max(t for t, _ in every)
    for i in range(25):
        budget = low + (high - low) * i // 24
        plan = fit_memory(config, budget, batch_size=4, image_size=res, device="cpu")
        assert plan.estimated_peak <= budget
        # it plans for FIT_SHARE of the budget (the floor, when only that fits)
        cheapest = min([x for t, x in every if t <= int(budget * FIT_SHARE)] or [plan.estimated_extra_time])
        assert plan.estimated_extra_time <= cheapest + 1e-12, (budget, plan)


def test_fit_memory_below_the_floor_names_smallest_budget_and_largest_batch():
    with torch.device("meta"):  # the planner reads the architecture, never the weights
        model = de.densenet121()
    with pytest.raises(MemoryBudgetError) as err:
        model.fit_memory("450MiB", batch_size=16, device="cpu")
    e = err.value
    floor = estimate_memory(
        "densenet121", batch_size=16, mode="max_saving", device="cpu", optimizer="momentum"
    )
    assert e.floor == floor.total
    assert e.max_batch_size == max_batch_size(
        "densenet121", "450MiB", mode="max_saving", device="cpu", optimizer="momentum"
    )
    assert 0 < e.max_batch_size < 16
    assert str(e).startswith("450 MiB is below what densenet121 needs for a batch of 16 at 224x224")
    assert f"the largest batch that fits 450 MiB is {e.max_batch_size}" in str(e)
    assert model.memory_efficient == "naive", "a failed fit leaves the model as it was"
    with pytest.raises(MemoryBudgetError, match="not even a batch of 1 fits"):
        model.fit_memory("20MiB", batch_size=16, device="cpu")


def test_fit_memory_applies_the_plan_and_spends_more_time_only_when_needed():
    model = de.densenet_bc_100()
    roomy = model.fit_memory("8GiB", batch_size=64, device="cpu")
    assert model.memory_efficient == "efficient" and roomy.estimated_extra_time == 0.0
    floor = estimate_memory(
        "densenet_bc_100", batch_size=64, mode="max_saving", device="cpu", optimizer="momentum"
    )
    tight = model.fit_memory(floor.total, batch_size=64, device="cpu")
    assert model.memory_plan == tight and tight.estimated_peak <= floor.total
    mid = model.fit_memory((floor.total + roomy.estimated_peak) // 2, batch_size=64, device="cpu")
    assert 0 < mid.estimated_extra_time < tight.estimated_extra_time or tight.estimated_extra_time == 0
    assert (mid.budget, mid.batch_size, mid.image_size) == ((floor.total + roomy.estimated_peak) // 2, 64, 32)
    assert parse_memory("450MB") == 450 * 10**6  # the string forms fit_memory accepts
