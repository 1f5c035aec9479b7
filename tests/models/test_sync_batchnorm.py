"""Synchronised batch norm, exact, on CPU: 2 and 3 gloo processes in float64 against one process
running plain batch norm on the concatenated batch, in every engine mode, a dial and naive.

Each spawn runs every (architecture, mode) case, so a world costs one process start per rank.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake
from torch.nn.parallel import DistributedDataParallel as DDP

import densenet_efficient as de
from densenet_efficient.errors import UsageError
from densenet_efficient.models.engine import ops, sync
from densenet_efficient.models.planner.verify import _sync_world_size

from .test_compile import tail_case
from .test_engine import TINY, TINY_IMAGENET

#: (name, model kwargs, image size, memory setting): naive, both modes and a dial, CIFAR and
#: ImageNet stems (the stem tail), at least two layers per block (shared statistics).
CASES = [
    ("cifar-naive", TINY, 8, "naive"),
    ("cifar-efficient", TINY, 8, "efficient"),
    ("cifar-max_saving", TINY, 8, "max_saving"),
    ("imagenet-efficient", TINY_IMAGENET, 32, "efficient"),
    ("imagenet-dial", TINY_IMAGENET, 32, [1, "max_saving", "naive", True]),
    # torch's own converter: the engine reads nn.SyncBatchNorm modules (whose own forward is
    # CUDA-only, and which DDP refuses on CPU: gradients averaged by hand below)
    ("torch-converted-efficient", TINY_IMAGENET, 32, "efficient"),
]


#: Under torch.compile (the synchronised ops, and the naive block's traced SyncBatchNorm2d): the dial,
#: whose ImageNet model runs every kind of call (stem, naive, max_saving and efficient blocks,
#: transitions, norm5); one case, as each costs a compilation per rank.
COMPILED_CASES = [CASES[4]]


def _model(kwargs: dict, setting) -> de.DenseNet:
    torch.manual_seed(0)
    model = de.DenseNet(**kwargs).double()
    for m in model.modules():  # non-trivial affine parameters and running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.set_memory_efficient(setting).train()


def _batch(size: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(total, 3, size, size, dtype=torch.float64) * 2 + 0.5, torch.randint(0, 5, (total,))


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    out = model(x)
    (F.cross_entropy(out, y, reduction="sum") * scale).backward()
    return out.detach()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    grads = {f"grad.{n}": p.grad.clone() for n, p in model.named_parameters()}
    return {**{k: v.clone() for k, v in model.state_dict().items()}, **grads}


def _worker(rank: int, world: int, sizes: list[int], folder: str, compiled: bool = False) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    calls = {"gather": 0, "reduce": 0, "gathered": 0, "reduced": 0}
    gather, reduce = sync._all_gather, sync._all_reduce

    def counted(kind, fn):
        def run(t, group):
            if not torch.compiler.is_compiling() and not is_fake(t):  # tracing's calls send nothing
                calls[kind] += 1
                calls[kind + ("ed" if kind == "gather" else "d")] += t.numel()  # elements sent per rank
            return fn(t, group)

        return run

    sync._all_gather, sync._all_reduce = counted("gather", gather), counted("reduce", reduce)
    results = {}
    start, total = sum(sizes[:rank]), sum(sizes)
    for name, kwargs, size, setting in COMPILED_CASES if compiled else CASES:
        by_torch = name.startswith("torch")
        convert = nn.SyncBatchNorm.convert_sync_batchnorm if by_torch else de.convert_sync_batchnorm
        model = convert(_model(kwargs, setting))
        ddp = model if by_torch else DDP(model)  # on CPU DDP refuses torch's SyncBatchNorm, not ours
        graph_ops: set[str] = set()
        if compiled:  # as `train --compile` wraps it, recording what the graphs call
            ddp = torch.compile(ddp, backend=_recording_inductor(graph_ops))
        x, y = _batch(size, total)
        calls.update(gather=0, reduce=0, gathered=0, reduced=0)
        # DDP averages gradients over ranks: scale each rank's sum so the average is the global mean's
        out = _step(ddp, x[start : start + sizes[rank]], y[start : start + sizes[rank]], world / total)
        if by_torch:
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        results[name] = {
            "out": out,
            "state": _state(model),
            "calls": dict(calls),
            "graph_ops": sorted(graph_ops),
        }
        results[name]["planned_world"] = _sync_world_size(model)  # what fit_memory plans for
        try:  # verifying would measure steps on one rank alone: refused before anything runs
            model.fit_memory("1GiB", batch_size=2, verify=True)
            results[name]["verify"] = "ran"
        except UsageError as err:
            results[name]["verify"] = str(err)
        with torch.no_grad():  # eval: the running statistics, no collective
            results[name]["eval"] = model.eval()(x[start : start + sizes[rank]])
        results[name]["eval_calls"] = (
            calls["gather"] + calls["reduce"] - sum(results[name]["calls"][k] for k in ("gather", "reduce"))
        )
    torch.save(results, Path(folder) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _recording_inductor(seen: set[str]):
    """Inductor, after noting every op the graphs dynamo hands it call."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        seen.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return compile_fx(gm, example_inputs)

    return backend


def _run_world(tmp_path: Path, sizes: list[int], compiled: bool = False) -> list[dict]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(len(sizes), sizes, str(tmp_path), compiled), nprocs=len(sizes), join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(len(sizes))]


@pytest.mark.parametrize(
    "sizes", [[2, 2], [3, 1], [2, 1, 3], [3, 0]], ids=["2-even", "2-uneven", "3-uneven", "2-one-empty"]
)
def test_synchronised_batch_norm_equals_one_process_on_the_whole_batch(tmp_path, sizes):
    _check_world(_run_world(tmp_path, sizes), sizes, CASES)


def test_compiled_synchronised_batch_norm_equals_one_process_on_the_whole_batch(tmp_path):
    """torch.compile(DDP(model)) on 2 gloo ranks with uneven batches: the compiled step's collectives
    run inside the synchronised ops (and the traced naive SyncBatchNorm2d), exactly."""
    sizes = [3, 1]
    ranks = _run_world(tmp_path, sizes, compiled=True)
    _check_world(ranks, sizes, COMPILED_CASES)
    for r in ranks:  # the engine's synchronised ops ran inside the compiled graphs
        ops_called = r[COMPILED_CASES[0][0]]["graph_ops"]
        assert {
            "densenet_efficient.sync_dense_block.default",
            "densenet_efficient.sync_norm_relu_tail.default",
        } <= set(ops_called)


def test_a_compiled_step_with_an_empty_rank(tmp_path):
    """Compiled, a rank with an empty batch runs its step eagerly (torch's compiled
    convolution backward fails on an empty batch) and still takes part with weight 0: exact."""
    sizes = [3, 0]
    _check_world(_run_world(tmp_path, sizes, compiled=True), sizes, COMPILED_CASES)


def _check_world(ranks: list[dict], sizes: list[int], cases: list) -> None:
    total = sum(sizes)
    for name, kwargs, size, setting in cases:
        model = _model(kwargs, setting)
        x, y = _batch(size, total)
        expected_out = _step(model, x, y, 1 / total)
        expected = _state(model)
        out = torch.cat([r[name]["out"] for r in ranks])
        torch.testing.assert_close(out, expected_out, rtol=1e-10, atol=1e-12, msg=name)
        for r in ranks:  # every rank holds the global running statistics and (DDP-averaged) gradients
            for key, value in expected.items():
                torch.testing.assert_close(
                    r[name]["state"][key], value, rtol=1e-9, atol=1e-11, msg=f"{name} {key}"
                )
        calls = ranks[0][name]["calls"]
        assert calls["gather"] > 0 and calls["reduce"] > 0, name
        with torch.no_grad():
            expected_eval = model.eval()(x)
        assert all(r[name]["eval_calls"] == 0 for r in ranks), name
        assert all(r[name]["planned_world"] == len(sizes) for r in ranks), name
        assert all("synchronise over a process group" in r[name]["verify"] for r in ranks), name
        torch.testing.assert_close(
            torch.cat([r[name]["eval"] for r in ranks]), expected_eval, rtol=1e-9, atol=1e-11, msg=name
        )


def test_collectives_per_step_and_what_they_carry(tmp_path):
    """Naive: one gather per BN forward and one all-reduce per BN backward, as torch's SyncBatchNorm.
    The engine: a gather per measured channel group (a block's input, each layer's new channels but
    the last's) and per norm2 and tail BN, the same count, but a layer's norm1 sends only its ``k``
    new channels' statistics, not its whole input's; backward one all-reduce per BN."""
    calls = _run_world(tmp_path, [1, 1])[0]
    layers, blocks = sum(TINY["block_config"]), len(TINY["block_config"])
    norms = 2 * layers + blocks  # norm1, norm2 per layer; transitions and norm5
    naive = calls["cifar-naive"]["calls"]
    assert (naive["gather"], naive["reduce"]) == (norms, norms)
    for mode in ("efficient", "max_saving"):
        engine = calls[f"cifar-{mode}"]["calls"]
        assert (engine["gather"], engine["reduce"]) == (norms, norms), (mode, engine)
        assert engine["gathered"] < naive["gathered"] and engine["reduced"] == naive["reduced"], (
            mode,
            engine,
            naive,
        )


def test_converted_weights_load_into_unconverted_and_torchvision_models():
    import torchvision

    model = de.convert_sync_batchnorm(de.densenet121())
    assert isinstance(model.features.norm0, de.SyncBatchNorm2d)
    state = model.state_dict()
    assert list(state) == list(de.densenet121().state_dict())
    torchvision.models.densenet121().load_state_dict(state)
    de.densenet121().load_state_dict(state)


def test_without_a_process_group_it_is_plain_batch_norm():
    plain = _model(TINY, "efficient")
    converted = de.convert_sync_batchnorm(_model(TINY, "efficient"))
    x, y = _batch(8, 4)
    torch.testing.assert_close(_step(converted, x, y, 1.0), _step(plain, x, y, 1.0), rtol=0, atol=0)
    assert sync.process_group([converted.features.norm5]) is None


@pytest.fixture
def one_rank_group():
    """A gloo process group of one rank in this process: the synchronised ops' collectives run on it."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("keep", [(True, True), (False, True)], ids=str)
def test_synchronised_block_op_passes_opcheck(one_rank_group, keep):
    """Schema, fake kernel (static and dynamic shapes), autograd registration, AOT dispatch."""
    model = de.convert_sync_batchnorm(de.DenseNet(**{**TINY_IMAGENET, "drop_rate": 0.2}).double())
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64, requires_grad=True)
    x, params, running, eps, drop, keep, _, graph, dense_copy, dtype = ops.block_op_args(
        list(model.features.denseblock1.values()), x, keep, True
    )
    args = (x, params, running, eps, drop, keep, graph, dense_copy, dtype, sync.group_name(one_rank_group))
    torch.library.opcheck(torch.ops.densenet_efficient.sync_dense_block.default, args)


@pytest.mark.parametrize("kind,keep", [("transition", False), ("stem", True), ("identity", True)])
def test_synchronised_tail_op_passes_opcheck(one_rank_group, kind, keep):
    x, norm, module = tail_case(de.convert_sync_batchnorm(de.DenseNet(**TINY_IMAGENET).double()), kind)
    args = (*ops.tail_op_args(x, norm, module, kind, keep), sync.group_name(one_rank_group))
    torch.library.opcheck(torch.ops.densenet_efficient.sync_norm_relu_tail.default, args)
