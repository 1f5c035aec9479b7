"""The memory-efficient engine computes exactly what the naive path computes, in every mode."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import densenet_efficient as de
from densenet_efficient.errors import UsageError
from densenet_efficient.models import engine

from ..support.archs import ALL_ARCHS, numerics_config, train_size

EFFICIENT_MODES = ["efficient", "max_saving"]
TINY = dict(growth_rate=4, block_config=(2, 3), num_init_features=6, num_classes=5, small_inputs=True)
TINY_IMAGENET = dict(growth_rate=4, block_config=(2, 2, 2, 2), num_init_features=8, num_classes=5)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _randomise_bn(model: nn.Module) -> None:
    """Non-trivial affine parameters so every BN's gradient path is exercised."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


def _twins(mode: str, dtype=torch.float64, **kwargs) -> tuple[de.DenseNet, de.DenseNet]:
    naive = de.DenseNet(**kwargs).to(dtype)
    _randomise_bn(naive)
    eff = de.DenseNet(**kwargs, memory_efficient=mode).to(dtype)
    eff.load_state_dict(naive.state_dict())
    return naive, eff


def _train_steps(naive, eff, size, steps=3, batch=2, dtype=torch.float64):
    """Run ``steps`` forward/backward passes on both; return the last outputs and input grads."""
    for _ in range(steps):
        x = torch.randn(batch, 3, size, size, dtype=dtype)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = naive(xa), eff(xb)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
    return ya, yb, xa.grad, xb.grad


def _assert_same_state(naive, eff, tol=1e-9):
    _assert_state_matches({n: p.grad for n, p in naive.named_parameters()}, dict(naive.named_buffers()), eff, tol)


def _assert_state_matches(grads: dict, buffers: dict, eff, tol=1e-9):
    """``eff``'s parameter gradients and buffers equal the naive twin's ``grads`` and ``buffers``."""
    for (name, ga), pb in zip(grads.items(), eff.parameters(), strict=True):
        assert _rel(pb.grad, ga) < tol, name
    for (name, ba), bb in zip(buffers.items(), eff.buffers(), strict=True):
        if name.endswith("num_batches_tracked"):
            assert torch.equal(ba, bb), name
        else:
            assert torch.allclose(ba, bb, rtol=1e-10, atol=1e-12), name


class _NaiveRuns:
    """The naive twin's float64 training steps per architecture, run once for both engine modes
    (they cost as much as the engine's): its initial state, the inputs and output gradients of
    each step, and what the steps left. Only the latest architecture is kept: a full-size float64
    densenet161 and its gradients are half a gigabyte."""

    def __init__(self) -> None:
        self.arch: str | None = None
        self.run: dict | None = None

    def __call__(self, arch: str) -> dict:
        if arch != self.arch:
            self.arch, self.run = None, None  # the previous one is freed before the next is built
            self.run, self.arch = self._steps(numerics_config(arch)), arch
        return self.run

    @staticmethod
    def _steps(cfg, steps: int = 3, batch: int = 2) -> dict:
        naive = de.DenseNet(**cfg.to_kwargs()).to(torch.float64)
        _randomise_bn(naive)
        initial = {k: v.clone() for k, v in naive.state_dict().items()}
        size, pairs = train_size(cfg), []
        for _ in range(steps):
            x = torch.randn(batch, 3, size, size, dtype=torch.float64)
            xa = x.clone().requires_grad_()
            ya = naive(xa)
            g = torch.randn_like(ya)
            ya.backward(g)
            pairs.append((x, g))
        grads = {n: p.grad for n, p in naive.named_parameters()}
        return dict(initial=initial, pairs=pairs, y=ya.detach(), x_grad=xa.grad, grads=grads,
                    buffers={n: b.clone() for n, b in naive.named_buffers()})  # fmt: skip


@pytest.fixture(scope="module")
def naive_runs() -> _NaiveRuns:
    return _NaiveRuns()


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_every_arch_matches_naive_float64(arch, mode, naive_runs):
    """Every registered architecture (full size: :data:`FULL_WIDTH`): outputs, input and parameter gradients and BN
    statistics of three float64 training steps equal the naive path's (run once per architecture
    for both modes, from the same initial state and the same inputs)."""
    naive = naive_runs(arch)
    eff = de.DenseNet(**numerics_config(arch).to_kwargs(), memory_efficient=mode).to(torch.float64)
    eff.load_state_dict(naive["initial"])
    for x, g in naive["pairs"]:
        xb = x.clone().requires_grad_()
        yb = eff(xb)
        yb.backward(g)
    assert _rel(yb, naive["y"]) < 1e-9
    assert _rel(xb.grad, naive["x_grad"]) < 1e-9
    _assert_state_matches(naive["grads"], naive["buffers"], eff)
    assert int(eff.features.denseblock1.denselayer1.norm1.num_batches_tracked) == 3  # once per forward


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
@pytest.mark.parametrize("kwargs,size", [(TINY, 9), (TINY_IMAGENET, 33)])
def test_odd_sizes_and_eval_mode(mode, kwargs, size):
    naive, eff = _twins(mode, **kwargs)
    _train_steps(naive, eff, size)
    naive.eval(), eff.eval()
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        ya, yb = naive(x), eff(x)
    assert yb.grad_fn is None
    assert _rel(yb, ya) < 1e-12
    # eval mode with gradients (fine-tuning with frozen BN statistics)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    naive(xa).sum().backward()
    eff(xb).sum().backward()
    assert _rel(xb.grad, xa.grad) < 1e-9


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
def test_no_grad_training_forward_updates_stats_once(mode):
    naive, eff = _twins(mode, **TINY)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert _rel(eff(x), naive(x)) < 1e-12
    for (name, ba), bb in zip(naive.named_buffers(), eff.buffers(), strict=True):
        assert torch.allclose(ba.double(), bb.double(), rtol=1e-10, atol=1e-12), name


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
def test_cumulative_momentum(mode):
    naive, eff = _twins(mode, **TINY)
    for model in (naive, eff):
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
    _train_steps(naive, eff, 8, steps=2)
    _assert_same_state(naive, eff)


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
def test_frozen_features_only_classifier_learns(mode):
    naive, eff = _twins(mode, **TINY)
    for model in (naive, eff):
        model.features.requires_grad_(False)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    naive(x).sum().backward()
    eff(x).sum().backward()
    assert all(p.grad is None for p in eff.features.parameters())
    assert _rel(eff.classifier.weight.grad, naive.classifier.weight.grad) < 1e-12


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
def test_dropout_replays_forward_mask(mode):
    kwargs = {**TINY, "drop_rate": 0.3}
    naive, eff = _twins(mode, **kwargs)
    for _ in range(2):
        x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(7)
        ya = naive(xa)
        torch.manual_seed(7)
        yb = eff(xb)
        assert _rel(yb, ya) < 1e-12  # same RNG draws in the same order
        g = torch.randn_like(ya)
        torch.manual_seed(99)  # backward must not draw new random numbers
        ya.backward(g)
        yb.backward(g)
        assert _rel(xb.grad, xa.grad) < 1e-9
    _assert_same_state(naive, eff)


def test_dropout_gradcheck():
    model = de.DenseNet(**{**TINY, "block_config": (2,), "drop_rate": 0.5}, memory_efficient=True).double()
    model.eval()  # gradcheck needs a deterministic function: the mask is fixed per call below
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)

    def fn(inp):
        torch.manual_seed(3)
        model.train()
        for m in model.modules():  # keep running statistics out of the check
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.0
        return model(inp)

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
def test_bf16_autocast_close_to_fp32(mode):
    """Under bf16 autocast the engine is as close to fp32 naive as naive bf16 itself is."""
    naive, eff = _twins(mode, torch.float32, **TINY_IMAGENET)
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 5, (4,))
    ref = naive(x)
    F.cross_entropy(ref, y).backward()
    ref_grads = torch.cat([p.grad.flatten() for p in naive.parameters()])
    naive.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_naive, out_eff = naive(x), eff(x)
        loss_naive, loss_eff = F.cross_entropy(out_naive, y), F.cross_entropy(out_eff, y)
    assert out_eff.dtype == torch.bfloat16
    assert _rel(out_eff.float(), ref) < 0.1
    loss_naive.backward()
    loss_eff.backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in eff.parameters())
    err_eff = _rel(torch.cat([p.grad.flatten() for p in eff.parameters()]), ref_grads)
    err_naive = _rel(torch.cat([p.grad.flatten() for p in naive.parameters()]), ref_grads)
    assert err_eff < 2.5 * err_naive + 1e-3, (err_eff, err_naive)


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
def test_channels_last(mode):
    naive, eff = _twins(mode, torch.float32, **TINY_IMAGENET)
    eff = eff.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    xa = x.clone().requires_grad_()
    xb = x.clone().to(memory_format=torch.channels_last).requires_grad_()
    ya, yb = naive(xa), eff(xb)
    assert eff.forward_features(xb.detach()).is_contiguous(memory_format=torch.channels_last)
    assert _rel(yb, ya) < 1e-5
    ya.sum().backward()
    yb.sum().backward()
    # fp32 with different reduction orders: agreement to float32 rounding, amplified by BN
    assert _rel(xb.grad, xa.grad) < 1e-3
    for pa, pb in zip(naive.parameters(), eff.parameters(), strict=True):
        assert _rel(pb.grad, pa.grad) < 1e-3


def test_double_backward_is_refused():
    model = de.DenseNet(**TINY, memory_efficient=True).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice|once_differentiable"):
        g.sum().backward()


def test_torch_sync_batchnorm_without_a_process_group_is_plain_batch_norm():
    """The engine reads torch's SyncBatchNorm modules (synchronised runs: test_sync_batchnorm.py);
    outside a process group they are batch norm, as torch's own module is."""
    torch.manual_seed(0)
    plain = de.DenseNet(**TINY, memory_efficient=True)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)


def test_mode_switch_keeps_parameters():
    model = de.densenet_bc(16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for mode in ("max_saving", True, "naive", "max_saving"):
        model.set_memory_efficient(mode)
    assert model.memory_efficient == "max_saving"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_block_never_concatenates(monkeypatch):
    """The efficient path must not call torch.cat (the naive path does, every layer)."""
    calls = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: calls.append(1) or real_cat(*a, **k))
    model = de.DenseNet(**TINY, memory_efficient=True)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    with torch.no_grad():
        model.eval()(torch.randn(2, 3, 8, 8))
    assert calls == []
    de.DenseNet(**TINY)(torch.randn(2, 3, 8, 8))
    assert calls


# -- DistributedDataParallel: 2 gloo processes on CPU -------------------------------------------


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    grads = {}
    for mode in ("naive", "efficient", "max_saving"):
        torch.manual_seed(0)
        model = de.DenseNet(**TINY, memory_efficient=mode).double()
        ddp = nn.parallel.DistributedDataParallel(model)
        torch.manual_seed(100 + rank)  # each rank its own data
        x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
        y = torch.randint(0, 5, (4,))
        F.cross_entropy(ddp(x), y).backward()
        grads[mode] = [p.grad.clone() for p in model.parameters()]
    if rank == 0:
        torch.save(grads, out)
    dist.destroy_process_group()


def test_ddp_gloo_two_processes_same_gradients(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = str(tmp_path / "grads.pt")
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    grads = torch.load(out, weights_only=True)
    for mode in ("efficient", "max_saving"):
        for ga, gb in zip(grads["naive"], grads[mode], strict=True):
            assert _rel(gb, ga) < 1e-9


def test_engine_mode_names():
    assert engine.resolve_mode(True) == "efficient"
    assert engine.resolve_mode(False) == "naive"
    assert engine.resolve_mode("max_saving") == "max_saving"
    for alias in ("max", "default", "fast"):  # one name per mode: "default" would not mean the default
        with pytest.raises(UsageError, match="memory_efficient must be"):
            engine.resolve_mode(alias)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_scratch_views_are_dense_in_the_blocks_format_and_never_past_the_scratch(fmt):
    """A scratch view is the dense (n, c, h, w) tensor of the block's format at the scratch's start;
    one wider than the scratch raises, on fake tensors too (``as_strided`` checks no bounds there)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from densenet_efficient.models.engine.kernels import Scratch

    for mode in (None, FakeTensorMode()):
        with mode if mode is not None else torch.no_grad():
            like = torch.empty(2, 5, 3, 4).contiguous(memory_format=fmt)
            scratch = Scratch(like, 4, fmt)
            view = scratch.view(3)
            assert view.shape == (2, 3, 3, 4) and view.is_contiguous(memory_format=fmt)
            assert view.untyped_storage()._cdata == scratch.flat.untyped_storage()._cdata
            assert view.storage_offset() == 0
            with pytest.raises(RuntimeError, match="scratch of 96 elements asked for 5 channels"):
                scratch.view(5)


@pytest.mark.parametrize("graph", [True, False], ids=["training", "no-backward"])
def test_the_reference_block_frees_a_layer_s_temporaries_before_the_next_layer(monkeypatch, graph):
    """The Python reference allocates as the C++ loop does (the planner simulates the step on it):
    a layer's bottleneck (not kept) and new features die with its iteration, not when the next
    layer's convolutions replace them (the next 1x1 convolution then held one bottleneck more: 11
    MiB in DenseNet-BC-40's first block at batch 64, where a step whose features are frozen peaks).
    And with no backward to come, nothing is kept, as the native op folds it."""
    import weakref

    from densenet_efficient.models.engine import block as block_module

    made: list = []
    alive: list[list[bool]] = []
    real_conv = block_module.conv

    def conv(z, module, weight):
        alive.append([r() is not None for r in made])
        out = real_conv(z, module, weight)
        made.append(weakref.ref(out))
        return out

    monkeypatch.setattr(block_module, "conv", conv)
    model = de.densenet_bc(40, memory_efficient="max_saving" if graph else True).train()
    model.requires_grad_(graph)
    x = torch.randn(2, 24, 8, 8)
    with engine.reference_engine(), torch.set_grad_enabled(graph):
        model.features.denseblock1(x)
    layers = len(alive) // 2
    assert layers == 6
    for i in range(layers):
        assert not any(alive[2 * i]), f"layer {i}'s 1x1 convolution ran with {alive[2 * i]} alive"
