"""The planner with synchronised batch norm: the engine's synchronised step simulated with stand-in
collectives (``sync_bn_world_size``), against the collectives the engine really issues, the plain
step's estimate, a budget, and ``train --sync-bn``'s planning."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn

import densenet_efficient as de
import densenet_efficient.training.budget as budget
import densenet_efficient.training.loop as loop
from densenet_efficient.errors import UsageError
from densenet_efficient.models.config import ArchConfig, densenet_bc_config
from densenet_efficient.models.engine import sync
from densenet_efficient.models.memory_plan import resolve_memory_plan
from densenet_efficient.models.planner import estimate_memory, fit_memory, max_batch_size
from densenet_efficient.models.planner.estimate import simulation
from densenet_efficient.models.planner.simulate import simulate, simulated_collectives
from densenet_efficient.models.registry import model_class
from densenet_efficient.training import TrainConfig
from densenet_efficient.training.data import DataBundle
from densenet_efficient.training.distributed import DistInfo

BC16 = densenet_bc_config(16)
#: An ImageNet stem (norm0 in the engine's stem tail) and four blocks, tiny.
TINY = ArchConfig(growth_rate=8, block_config=(1, 2, 1, 1), num_init_features=8, bn_size=2, num_classes=7)
#: One dense block, no transition: norm5 reads the widest input of every batch norm, and its
#: backward runs first, while every activation is alive.
ONE_BLOCK = ArchConfig(
    growth_rate=12, block_config=(4,), num_init_features=24, num_classes=10, small_inputs=True
)
WORLD = 4


def _norms(config: ArchConfig, image_size: int) -> list[int]:
    """Each batch norm's input elements per image, from the model itself (one image forward)."""
    model = model_class()(**config.to_kwargs())
    sizes: list[int] = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(lambda mod, args, out: sizes.append(args[0][0].numel()))
    model(torch.zeros(1, config.in_chans, image_size, image_size))
    return sizes


@pytest.mark.parametrize("mode", ["naive", "efficient", "max_saving"])
@pytest.mark.parametrize(("config", "size"), [(BC16, 32), (TINY, 64)], ids=["bc16", "imagenet_stem"])
def test_the_simulated_step_issues_the_engines_collectives(config, size, mode):
    """One gather per batch norm in forward and one all-reduce per batch norm in backward: naive as
    torch's SyncBatchNorm, the engine once per channel group and per backward (README's table,
    measured on gloo by scripts/sync_bn_count.py). None without synchronisation."""
    bns = len(_norms(config, size))
    setting = resolve_memory_plan(mode, config)
    synced = simulate(config, setting, image_size=size, sync_bn_world_size=WORLD)
    assert (synced.gathers, synced.all_reduces) == (bns, bns)
    plain = simulate(config, setting, image_size=size)
    assert (plain.gathers, plain.all_reduces) == (0, 0)


def test_the_synchronised_backward_temporaries_raise_the_naive_peak_by_the_widest_norm():
    """Plain BN backward is one kernel; the synchronised one computes ``dy * (x - mean)`` and
    ``(dy - mean_dy - (x - mean) * proj) * ...`` in activation-sized temporaries. In naive mode with
    one block, the widest batch norm (norm5) runs its backward first, at the step's peak: the
    estimate rises by at least one float32 temporary of its input."""
    widest = max(_norms(ONE_BLOCK, 32))
    for batch in (8, 64):
        plain = estimate_memory(ONE_BLOCK, batch_size=batch, mode="naive", device="cpu")
        synced = estimate_memory(
            ONE_BLOCK, batch_size=batch, mode="naive", device="cpu", sync_bn_world_size=WORLD
        )
        assert synced.total - plain.total >= 4 * widest * batch


@pytest.mark.parametrize("mode", ["efficient", "max_saving"])
def test_the_engines_synchronised_step_needs_more_per_image(mode):
    """In the engine's modes the synchronised backward's temporaries are activation-sized too: the
    excess over the plain step grows with the batch (the gathered statistics do not)."""
    excess = [
        estimate_memory(BC16, batch_size=b, mode=mode, device="cpu", sync_bn_world_size=WORLD).total
        - estimate_memory(BC16, batch_size=b, mode=mode, device="cpu").total
        for b in (8, 64)
    ]
    assert 0 < excess[0] < excess[1]


def test_one_process_is_plain_batch_norm():
    plain = estimate_memory(BC16, batch_size=32, mode="efficient", device="cpu")
    assert estimate_memory(BC16, batch_size=32, mode="efficient", device="cpu", sync_bn_world_size=1) == plain
    assert simulation(BC16, resolve_memory_plan("efficient", BC16), 32, sync_bn_world_size=1).gathers == 0


def test_a_synchronised_plan_fits_its_budget_by_the_simulation():
    """A budget between the synchronised max_saving and efficient steps: the plan fitted with
    ``sync_bn_world_size`` keeps some bottlenecks, and its synchronised step, simulated whole,
    is within the budget."""
    kw = dict(batch_size=64, image_size=32, device="cpu", sync_bn_world_size=WORLD)
    low = estimate_memory(BC16, mode="max_saving", **kw).total
    high = estimate_memory(BC16, mode="efficient", **kw).total
    limit = (low + high) // 2
    plan = fit_memory(BC16, limit, **kw)
    assert plan.mode is None  # a mix of kept and recomputed bottlenecks
    assert plan.estimated_peak == estimate_memory(BC16, mode=plan, **kw).total <= limit
    fitted = max_batch_size(
        BC16, limit, image_size=32, mode="max_saving", device="cpu", sync_bn_world_size=WORLD
    )
    assert estimate_memory(BC16, mode="max_saving", **{**kw, "batch_size": fitted}).total <= limit


def test_the_stand_in_group_is_this_threads_only_and_gone_after_a_raise(monkeypatch):
    """A training step in another thread (or after the simulation) synchronises over its real
    process group, never the planner's stand-in, whose collectives return unread memory."""
    bn = de.convert_sync_batchnorm(nn.BatchNorm2d(4)).train()

    def broken(*args, **kwargs):
        raise RuntimeError("statistics failed")

    with monkeypatch.context() as m:
        m.setattr(sync, "batch_stats", broken)
        with pytest.raises(RuntimeError, match="statistics failed"):
            simulate(BC16, resolve_memory_plan("efficient", BC16), image_size=32, sync_bn_world_size=2)
    assert sync.process_group([bn]) is None  # no process group in this process, no stand-in left
    elsewhere = []
    with simulated_collectives(3) as group:
        assert sync.process_group([bn]) is group
        thread = threading.Thread(target=lambda: elsewhere.append(sync.process_group([bn])))
        thread.start()
        thread.join()
        assert sync._all_gather(torch.zeros(5), group).shape == (15,)
        assert sync._all_reduce(torch.zeros(2, 5), group).shape == (2, 5)
    assert elsewhere == [None]
    assert (group.gathers, group.all_reduces) == (1, 1)
    assert sync.process_group([bn]) is None


@pytest.mark.parametrize("bad", [0, -2, 2.0, True, "4", 10**18])
def test_a_bad_world_size_is_one_sentence(bad):
    with pytest.raises(UsageError, match=r"^sync_bn_world_size must be an integer in 1..1048576, found"):
        estimate_memory(BC16, batch_size=8, device="cpu", sync_bn_world_size=bad)
    with pytest.raises(UsageError, match=r"^sync_bn_world_size must be an integer in 1..1048576, found"):
        fit_memory(BC16, "1GiB", batch_size=8, device="cpu", sync_bn_world_size=bad)


@pytest.mark.parametrize(
    ("world", "sync_bn", "batch_size", "expected"),
    [(4, True, 8, 4), (4, True, "auto", 4), (4, False, 8, None), (1, True, 8, None)],
)
def test_choose_budget_plans_with_the_jobs_world_size(monkeypatch, world, sync_bn, batch_size, expected):
    """``train --sync-bn`` under torchrun: the planner gets the world size (the model is converted
    only then); a single process or plain batch norm plans plain."""
    seen: list[dict] = []

    def record(real):
        def planner(*args, **kwargs):
            seen.append(kwargs)
            return real(*args, **kwargs)

        return planner

    monkeypatch.setattr(budget, "fit_memory", record(budget.fit_memory))
    monkeypatch.setattr(budget, "max_batch_size", record(budget.max_batch_size))
    choice = budget.choose_budget(
        densenet_bc_config(10, 6, num_classes=10), memory="200MiB", batch_size=batch_size, accum_steps=1,
        image_size=32, amp=None, optimizer="momentum", train_images=80, device=torch.device("cpu"),
        info=DistInfo(rank=0, world_size=world), sync_bn=sync_bn,
    )  # fmt: skip
    assert len(seen) == (2 if batch_size == "auto" else 1)
    assert all(kw.get("sync_bn_world_size") == expected for kw in seen)
    assert choice.plan.estimated_peak <= choice.budget


def test_the_training_loop_hands_sync_bn_to_the_budget(monkeypatch):
    """``_choose_budget`` passes ``--sync-bn`` and the job (whose world size decides) to ``choose_budget``."""
    seen: list[dict] = []
    monkeypatch.setattr(
        loop, "choose_budget", lambda *a, **kw: seen.append(kw) or budget.choose_budget(*a, **kw)
    )
    data = DataBundle("fake", list(range(80)), None, None, [str(i) for i in range(10)], 32, True)
    info = DistInfo(rank=0, world_size=3)
    c = TrainConfig(depth=10, growth_rate=6, sync_bn=True, memory="200MiB", batch_size=8, device="cpu")
    _, choice = loop._choose_budget(c, data, info, torch.device("cpu"), None)
    assert seen[0]["sync_bn"] is True and seen[0]["info"] is info
    synced = estimate_memory(densenet_bc_config(10, 6, num_classes=10), batch_size=8, mode=choice.plan,
                             device="cpu", sync_bn_world_size=3)  # fmt: skip
    assert choice.plan.estimated_peak == synced.total
