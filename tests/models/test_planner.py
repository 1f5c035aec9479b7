"""The planner: the simulated step against the engine's own execution, the composition against
whole simulations, one fitted plan against a measured step, and the user-facing edges.
(scripts/planner_grid.py measures the full grid of docs/planner.md.)"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import densenet_efficient as de
from densenet_efficient.cli import main
from densenet_efficient.errors import UsageError
from densenet_efficient.models.config import densenet_bc_config
from densenet_efficient.models.memory_plan import MemoryPlan, resolve_memory_plan
from densenet_efficient.models.planner import (
    MemoryBudgetError,
    count_parameters,
    estimate_memory,
    fit_memory,
    format_bytes,
    max_batch_size,
    parse_memory,
)
from densenet_efficient.models.planner import shortcut as shortcut_module
from densenet_efficient.models.planner import simulate as simulate_module
from densenet_efficient.models.planner.allocator import cpu_scratch
from densenet_efficient.models.planner.bisection import first_true, last_true, last_within
from densenet_efficient.models.planner.compose import Composer
from densenet_efficient.models.planner.estimate import simulation
from densenet_efficient.models.planner.phantom import (
    Phantom,
    leaves,
    phantom,
    run,
    tree_map,
    values_only,
)
from densenet_efficient.models.planner.shortcut import SLOW, Shortcut
from densenet_efficient.models.planner.simulate import LiveBytes, run_step, simulate, simulation_batch
from densenet_efficient.models.planner.verify import step_down
from densenet_efficient.models.registry import model_class
from densenet_efficient.perf.measure import MEMORY_ENV, StepSpec, measure_series

from ..support import REPO
from ..support.archs import ALL_ARCHS

BC40 = densenet_bc_config(40)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_parameter_count_matches_model(arch):
    model = de.create_model(arch)
    assert count_parameters(model.arch_config) == sum(p.numel() for p in model.parameters())


def test_live_bytes_counts_what_the_step_really_allocates():
    """The tracker on real tensors: its live bytes are those of the storages alive, freed ones gone."""
    live = LiveBytes(batch=7)
    with live:
        a = torch.empty(7, 4)  # 112 bytes, one slice per "image"
        assert type(a) is torch.Tensor  # a real tensor: only a simulation's factories make phantom ones
        b = torch.empty(3)  # 12 bytes, fixed
        c = a[1:]  # a view: no new storage
        assert (live.fixed, live.per) == (12, 16)
        del a
        assert (live.fixed, live.per) == (12, 16)  # the view keeps the storage
        del c
        assert (live.fixed, live.per) == (12, 0)
    assert b.numel() == 3


def test_the_simulation_is_the_step_at_every_batch():
    """One simulation (a prime batch) against the model's real tensors at two batch sizes: the
    persistent bytes are the parameters, buffers, gradients, momentum and batch; memory grows with
    the batch, naive the most."""
    model = de.densenet_bc(40)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    sims = {
        m: simulation(BC40, resolve_memory_plan(m, BC40), 32) for m in ("naive", "efficient", "max_saving")
    }
    for b in (1, 16):
        batch = b * (3 * 32 * 32 * 4 + 8)
        assert sims["efficient"].persistent.at(b) == 3 * params + buffers + batch
    per_image = {m: s.peak(17) - s.peak(16) for m, s in sims.items()}
    assert per_image["max_saving"] < per_image["efficient"] < per_image["naive"]


def test_cpu_scratch_is_the_reorders_of_a_convolution():
    """What the CPU model adds inside a convolution, and only where ATen runs it on oneDNN."""
    x, w, g = torch.empty(16, 8, 4, 4), torch.empty(3, 8, 1, 1), torch.empty(16, 3, 4, 4)
    conv, back = torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default
    fwd = (x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)
    bwd = (g, x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, False])
    out = g.numel() * 4
    assert (
        cpu_scratch(conv, fwd, batch=16, threads=1) == x.numel() * 4 + out // 4
    )  # input, a quarter of the output
    assert cpu_scratch(back, bwd, batch=16, threads=1) == int((out + x.numel() * 4) * 1.08)
    # a 1x1 convolution of a batch under 16 on one thread runs without oneDNN: no reorder
    assert cpu_scratch(conv, fwd, batch=8, threads=1) == 0 < cpu_scratch(conv, fwd, batch=8, threads=2)
    cl = (x.to(memory_format=torch.channels_last), *fwd[1:])
    assert cpu_scratch(conv, cl, batch=16, threads=1) == 0  # an NHWC input is read as it is
    assert cpu_scratch(torch.ops.aten.add.Tensor, (x, x), batch=16) == 0


class _Counted(LiveBytes):
    """The tracker, noting every op it sees."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ops = []
        self.made_phantoms = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self.made_phantoms += any(isinstance(t, Phantom) for t in leaves(out))
        return out


@pytest.mark.parametrize(
    ("depth", "mode", "options"),
    [
        (16, "efficient", {}),
        (16, "naive", {"amp": "bf16", "channels_last": True}),
        (16, "max_saving", {"amp": "bf16", "channels_last": True, "optimizer": "adam"}),
        (40, [1, "max_saving", True], {"optimizer": "adamw", "foreach": True}),
        ("imagenet", [1, "max_saving", True, "naive"], {}),
        ("imagenet", "max_saving", {"amp": "bf16", "channels_last": True}),
        (16, [True, "max_saving", "naive"], {"drop_rate": 0.2}),
        ("imagenet", [True, "max_saving", True, "naive"], {"frozen": True}),
    ],
    ids=["efficient", "naive-bf16-nhwc", "max_saving-bf16-nhwc-adam", "dial-adamw-foreach", "stem", "stem-bf16-nhwc",
         "dropout", "frozen-features"],  # fmt: skip
)
def test_the_simulation_is_the_real_step_op_by_op(depth, mode, options):
    """The step on phantom tensors (meta kernels, the shortcut's outputs, the conv rules) against the
    same step on real tensors, counted by the same tracker: the same ops in the same order, the same
    peak, and after every op the same bytes alive but where autograd adds a gradient into ``.grad``
    (below)."""
    if depth == "imagenet":  # densenet121's stem, transitions and head with fewer layers
        config, size = dataclasses.replace(de.get_config("densenet121"), block_config=(2, 3, 2, 2)), 64
    else:
        config, size = densenet_bc_config(depth), 32
    plan, batch = resolve_memory_plan(mode, config), 3
    options = dict(options)
    foreach, amp, optimizer = options.pop("foreach", False), options.pop("amp", None), options.pop("optimizer", "momentum")
    fmt = torch.channels_last if options.pop("channels_last", False) else torch.contiguous_format
    drop_rate, frozen = options.pop("drop_rate", 0.0), options.pop("frozen", False)
    prime = simulation_batch(config, size)

    def step(model, x, y, phantoms):
        model.set_memory_efficient(plan)
        live = _Counted(prime, shortcut=Shortcut(), phantom=phantoms)
        run_step(model, x, y, live, amp, optimizer, foreach=foreach, frozen=frozen)
        return [f + p * batch for f, p in live.trace], live.ops, live.made_phantoms

    real = step(
        model_class()(**config.to_kwargs(), drop_rate=drop_rate).to(memory_format=fmt),
        torch.randn(batch, 3, size, size).contiguous(memory_format=fmt),
        torch.randint(0, config.num_classes, (batch,)),
        False,
    )
    assert not real[2]  # the real step is real throughout: its factories (the engine's buffers) too
    simulated = step(
        simulate_module._phantom_model(config, None, "fp32", fmt == torch.channels_last, False, drop_rate),
        phantom(torch.empty(prime, 3, size, size, device="meta").contiguous(memory_format=fmt)),
        phantom(torch.zeros(prime, dtype=torch.long, device="meta")),
        True,
    )
    assert simulated[1] == real[1]
    assert max(simulated[0]) == max(real[0])
    # on real tensors, autograd's accumulation into .grad hands the tracker a tensor whose storage
    # it cannot tell from a new one (its data pointer reads 0): that op counts one gradient twice
    largest = max(p.numel() * p.element_size() for p in model_class()(**config.to_kwargs()).parameters())
    assert all(abs(s - r) <= largest for s, r in zip(simulated[0], real[0], strict=True))


def _real(t):
    """A CPU tensor of ``t``'s sizes, strides and dtype (zeros: indices must be valid)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).zero_() if isinstance(t, torch.Tensor) else t


def _meta(t):
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta") if isinstance(t, torch.Tensor) else t


def _outputs(out, inputs):
    """Each output's shape, strides, dtype, storage bytes and which inputs it aliases."""
    return [
        None
        if t is None
        else (
            t.shape, t.stride(), t.dtype, t.untyped_storage().nbytes(),
            [i for i, a in enumerate(inputs) if a.untyped_storage()._cdata == t.untyped_storage()._cdata],
        )
        for t in (out if isinstance(out, (tuple, list)) else (out,))
    ]  # fmt: skip


def _same_as_real(shortcut, func, args, kwargs=None, batch=5):
    """The shortcut's outputs on meta tensors against the op's own on real CPU tensors."""
    kwargs = kwargs or {}
    meta = shortcut(func, tree_map(_meta, args), tree_map(_meta, kwargs), batch)
    assert meta is not NotImplemented, func
    real_args, real_kwargs = tree_map(_real, args), tree_map(_real, kwargs)
    inputs = [a for a in leaves((real_args, real_kwargs)) if isinstance(a, torch.Tensor)]
    real = func(*real_args, **real_kwargs)
    meta_inputs = [a for a in leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
    assert [o[:3] for o in _outputs(meta, meta_inputs) if o] == [o[:3] for o in _outputs(real, inputs) if o], func
    return meta


def test_the_shortcut_makes_what_the_op_makes_and_leaves_the_rest():
    """Batch norm's outputs shaped like the real kernel's (dtype, size, memory format, the out=
    tensors returned: float32 statistics for a bf16 map, as the CPU kernel keeps them); an op it
    does not know, or an argument it cannot describe, runs the op itself."""
    shortcut, aten = Shortcut(), torch.ops.aten
    x = torch.empty(5, 6, 4, 3, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w, rm, rv = torch.empty(6), torch.empty(6), torch.empty(6)
    for func, args in (
        (aten._batch_norm_with_update.default, (x, w, w, rm, rv, 0.1, 1e-5)),
        (aten.native_batch_norm_backward.default, (x, x, w, None, None, rm, rv, True, 1e-5, [True, False, True])),
        (aten.batch_norm_update_stats.default, (x, rm, rv, 0.0)),  # no meta kernel at all
    ):
        _same_as_real(shortcut, func, args)
    g = torch.empty(5, 6, 4, 3, device="meta")
    assert shortcut(aten.threshold_backward.grad_input, (g, g, 0), {"grad_input": g}, 5) is g
    assert shortcut(aten.view.default, (g, [5, 72]), {}, 5) is NotImplemented  # a native meta kernel: it runs
    assert shortcut(aten.threshold_backward.default, (g, [g], 0), {}, 5) is NotImplemented  # refused: the op says why
    # add: type promotion read off the op; a broadcast is probed on real tensors
    half = torch.empty(5, 6, 4, 3, dtype=torch.bfloat16)
    summed = _same_as_real(shortcut, aten.add.Tensor, (half, torch.empty(5, 6, 4, 3)))
    assert summed.dtype == torch.float32
    _same_as_real(shortcut, aten.add.Tensor, (torch.empty(5, 6, 4, 3), torch.empty(5, 6, 4, 1)))
    # a transposed input: its output keeps its stride order, as the real op's does
    t = torch.empty(5, 6, 3, 4).transpose(2, 3)
    _same_as_real(shortcut, aten._batch_norm_with_update.default, (t, w, w, rm, rv, 0.1, 1e-5))
    # a slice along the channels (what the engine passes)
    buf = torch.empty(5, 9, 4, 3)
    fast = _same_as_real(shortcut, aten._batch_norm_with_update.default, (buf[:, :6], w, w, rm, rv, 0.1, 1e-5))
    assert fast[0].shape == (5, 6, 4, 3) and fast[0].is_contiguous()
    assert aten.view.default not in SLOW


def test_the_small_calls_find_the_batch_and_leave_views_to_the_op():
    """Ops with Python meta kernels run on real tensors with the batch replaced: the loss, the
    classifier, the pooled features, the statistics' ``stack`` into an ``out=`` slice; a dimension
    that only equals the batch is kept; a view of an input runs the op itself."""
    shortcut, aten = Shortcut(), torch.ops.aten
    logits, target = torch.empty(7, 10), torch.zeros(7, dtype=torch.long)
    out = _same_as_real(shortcut, aten.nll_loss_forward.default, (logits, target, None, 1, -100), batch=7)
    assert out[0].shape == ()
    _same_as_real(shortcut, aten._log_softmax.default, (logits, 1, False), batch=7)
    _same_as_real(shortcut, aten.addmm.default, (torch.empty(10), torch.empty(7, 48), torch.empty(48, 10)), batch=7)
    _same_as_real(shortcut, aten.mean.dim, (torch.empty(7, 48, 2, 2), [-1, -2], True), batch=7)
    rows = torch.empty(2, 12)
    stacked = _same_as_real(
        shortcut, aten.stack.out, ([torch.empty(6), torch.empty(6)],), {"out": rows[:, 3:9]}, batch=7
    )
    assert stacked.shape == (2, 6)
    # a dimension of 7 (one of the stand-in batches) that is not the batch, beside the batch
    wide = _same_as_real(shortcut, aten.addmm.default, (torch.empty(7), torch.empty(11, 5), torch.empty(5, 7)), batch=11)
    assert wide.shape == (11, 7)
    # one of torch's Python meta functions (pooling, mm) is read off the small calls too: it would
    # import sympy on its first call; a foreach op's composite loops over Python meta kernels
    _same_as_real(shortcut, aten.mm.default, (torch.empty(11, 5), torch.empty(5, 7)), batch=11)
    _same_as_real(shortcut, aten.max_pool2d_with_indices.default, (torch.empty(7, 3, 9, 9), [3, 3], [2, 2], [1, 1]), batch=7)
    sqrts = _same_as_real(shortcut, aten._foreach_sqrt.default, ([torch.empty(4, 3), torch.empty(5)],))
    assert [tuple(t.shape) for t in sqrts] == [(4, 3), (5,)]
    # no argument the batch's size (parameters): one call answers
    sqrts = _same_as_real(shortcut, aten._foreach_sqrt.default, ([torch.empty(4, 3), torch.empty(6)],), batch=11)
    assert [tuple(t.shape) for t in sqrts] == [(4, 3), (6,)]
    assert shortcut(aten.narrow.default, (torch.empty(7, 3, device="meta"), 0, 0, 2), {}, 7) is NotImplemented


def test_the_naive_engine_s_concatenations_are_made_as_the_op_makes_them():
    """``cat`` of maps along the channels, the format they share kept (NCHW, NHWC); mixed
    formats, another dimension or maps with a dimension of 1 are read off small calls: every
    answer is the real op's."""
    shortcut, aten = Shortcut(), torch.ops.aten
    last = torch.channels_last
    for fmt in (torch.contiguous_format, last):
        maps = [torch.empty(5, c, 4, 3).contiguous(memory_format=fmt) for c in (6, 2, 2)]
        out = _same_as_real(shortcut, aten.cat.default, (maps, 1))
        assert out.shape == (5, 10, 4, 3) and out.is_contiguous(memory_format=fmt)
    assert not shortcut.small  # no small call was needed
    mixed = [torch.empty(5, 6, 4, 3), torch.empty(5, 2, 4, 3).contiguous(memory_format=last)]
    _same_as_real(shortcut, aten.cat.default, (mixed, 1))
    _same_as_real(shortcut, aten.cat.default, ([torch.empty(5, 6, 4, 3), torch.empty(5, 6, 4, 3)], 2))
    _same_as_real(shortcut, aten.cat.default, ([torch.empty(5, 6, 1, 1).contiguous(memory_format=last)] * 2, 1))
    assert len(shortcut.small) == 3


def test_the_concatenations_of_empty_maps_are_laid_out_as_the_op_lays_them_out():
    """A map with no images or no rows has every memory format at once: ATen's ``cat`` makes its
    output contiguous whatever the strides its inputs were given, which the shared format of the
    inputs does not tell."""
    shortcut, cat = Shortcut(), torch.ops.aten.cat.default
    for shape in ((0, 2, 4, 3), (5, 2, 0, 3)):
        maps = [torch.empty(shape).contiguous(memory_format=torch.channels_last)] * 2
        out = shortcut(cat, (tree_map(_meta, maps), 1), {}, 5)
        if out is NotImplemented:  # the op's own meta kernel runs
            out = cat(tree_map(_meta, maps), 1)
        assert [o[:3] for o in _outputs(out, [])] == [o[:3] for o in _outputs(cat(maps, 1), [])], shape


def test_the_small_calls_leave_ops_that_change_an_input_s_shape_to_the_op():
    """An in-place op that changes its tensor's shape or strides (``unsqueeze_``, ``t_``) and an
    ``out=`` tensor the op resizes return the input they were given, but not as it was: the
    shortcut must not hand back the input unchanged (a wrong shape, and a resized ``out=``'s
    storage counted at its old size)."""
    shortcut, aten = Shortcut(), torch.ops.aten

    def meta(*shape):
        return torch.empty(*shape, device="meta")

    for func, make in (
        (aten.unsqueeze_.default, lambda: ((meta(7, 4), 0), {})),
        (aten.t_.default, lambda: ((meta(7, 4),), {})),
        (aten.transpose_.default, lambda: ((meta(7, 4, 3), 1, 2), {})),
        (aten.cat.out, lambda: (([meta(7, 6), meta(7, 6)],), {"out": meta(0)})),
        (aten.stack.out, lambda: (([meta(6), meta(6)],), {"out": meta(0)})),
        (aten.sum.IntList_out, lambda: ((meta(7, 6), [1]), {"out": meta(0)})),
    ):
        args, kwargs = make()
        out = shortcut(func, args, kwargs, 7)
        expected = func(*make()[0], **make()[1])
        if out is not NotImplemented:
            assert (out.shape, out.stride(), out.untyped_storage().nbytes()) == (
                expected.shape, expected.stride(), expected.untyped_storage().nbytes(),
            ), func  # fmt: skip


def test_the_small_calls_leave_ops_whose_outputs_depend_on_values_to_the_op():
    """A phantom tensor has no values, and the small calls' inputs hold zeros or whatever memory
    held: an op whose output's value or shape depends on its inputs' values (``item``, ``equal``,
    ``nonzero``, a boolean mask, ``unique``, ``bincount``) must not be answered from them, but
    refused as the meta kernel refuses it."""
    shortcut, aten = Shortcut(), torch.ops.aten

    def meta(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device="meta")

    long, mask = meta(7, 4, dtype=torch.long), meta(7, 4, dtype=torch.bool)
    for func, args in (
        (aten._local_scalar_dense.default, (meta((), dtype=torch.long),)),
        (aten._local_scalar_dense.default, (meta(()),)),
        (aten.equal.default, (meta(7, 4), meta(7, 4))),
        (aten.nonzero.default, (long,)),
        (aten.masked_select.default, (meta(7, 4), mask)),
        (aten.index.Tensor, (meta(7, 4), [mask])),
        (aten._unique2.default, (long,)),
        (aten.bincount.default, (meta(7, dtype=torch.long),)),
        (aten.repeat_interleave.Tensor, (meta(7, dtype=torch.long),)),
    ):
        assert shortcut(func, args, {}, 7) is NotImplemented, func
    live = LiveBytes(7, shortcut=Shortcut(), phantom=True)
    with live, pytest.raises((RuntimeError, NotImplementedError)):
        phantom(meta((), dtype=torch.long)).item()
    # an index by integers has a shape without values: it still runs (on the meta kernel)
    with live:
        picked = phantom(meta(7, 4))[phantom(meta(3, dtype=torch.long))]
    assert picked.shape == (3, 4)


def test_the_small_calls_tell_arguments_apart_by_name_and_place():
    """Two calls whose arguments flatten to the same values are different calls when those values
    sit in other arguments: ``right=True`` is not ``out_int32=True`` (an int64 output, not int32),
    and a max pool's ``[3, 3], [2]`` (a 3x3 window, stride 2) is not ``[3], [3, 2]`` (stride 3
    along the height). Each gets the op's own outputs (the small calls asked directly: the max
    pool's meta function would otherwise run)."""
    shortcut, aten = Shortcut(), torch.ops.aten

    def meta(*shape):
        return torch.empty(*shape, device="meta")

    pool, search = aten.max_pool2d_with_indices.default, aten.searchsorted.Tensor
    for func, args, kwargs in (
        (search, (meta(7, 5), meta(7, 3)), {"out_int32": True}),
        (search, (meta(7, 5), meta(7, 3)), {"right": True}),
        (pool, (meta(7, 4, 12, 12), [3, 3], [2], [1], [1]), {}),
        (pool, (meta(7, 4, 12, 12), [3], [3, 2], [1], [1]), {}),
    ):
        out, expected = shortcut._small(func, args, kwargs, 7), func(*args, **kwargs)
        assert _outputs(out, []) == _outputs(expected, []), (func, args, kwargs)


def test_the_small_calls_do_not_take_a_size_that_follows_the_batch_for_a_fixed_one():
    """An op along the batch makes a dimension that follows it without being it: a real FFT's
    ``batch // 2 + 1`` is 2 at a batch of both 2 and 3, which the small calls read as a fixed 2.
    The outputs are the op's own at the simulation's batch."""
    shortcut, aten = Shortcut(), torch.ops.aten
    for func, args in (
        (aten._fft_r2c.default, (torch.empty(31, 4, device="meta"), [0], 0, True)),
        (aten.avg_pool1d.default, (torch.empty(1, 31, device="meta"), [2], [2])),
    ):
        out = shortcut(func, args, {}, 31)
        if out is not NotImplemented:
            assert _outputs(out, []) == _outputs(func(*args), []), func


def test_a_small_call_too_large_for_memory_is_left_to_the_op(monkeypatch):
    """A small call holds the op's real sizes but the batch: maps of a huge image or width would
    need terabytes (a 100000 px densenet121 asked for 1.28 TB and raised). Beyond
    ``SMALL_CALL_BYTES`` the op's meta kernel answers, allocating nothing, and what it answers is
    what the small calls answer."""
    aten = torch.ops.aten
    pool = aten.avg_pool2d.default
    huge = torch.empty(11, 10**6, 1000, 1000, device="meta")  # 7 images of it: 28 TB
    assert Shortcut()(pool, (huge, [2, 2], [2, 2]), {}, 11) is NotImplemented
    x = torch.empty(11, 6, 8, 8, device="meta").contiguous(memory_format=torch.channels_last)
    small = Shortcut()(pool, (x, [2, 2], [2, 2]), {}, 11)
    monkeypatch.setattr(shortcut_module, "SMALL_CALL_BYTES", 0)
    assert Shortcut()(pool, (x, [2, 2], [2, 2]), {}, 11) is NotImplemented
    meta = pool(x, [2, 2], [2, 2])
    assert (small.shape, small.stride(), small.dtype) == (meta.shape, meta.stride(), meta.dtype)


def test_a_small_call_counts_a_broadcast_input_at_the_size_its_output_takes(monkeypatch):
    """A mean's backward divides its gradient expanded over the map: a storage of one value per
    channel whose output is the whole map. Counted by its storage, the small call ran under the
    cap and made the map for real (DenseNet-BC-40 with growth rate 100000: 3.1 GiB held; at
    937874, which the size check accepts, the process was killed for memory)."""
    div = torch.ops.aten.div.Scalar
    grad = torch.empty(11, 6, 1, 1, device="meta").expand(11, 6, 8, 8)
    made = 7 * 6 * 8 * 8 * 4  # the map at the larger stand-in, as the division makes it
    monkeypatch.setattr(shortcut_module, "SMALL_CALL_BYTES", made - 1)
    assert Shortcut()(div, (grad, 64), {}, 11) is NotImplemented
    monkeypatch.setattr(shortcut_module, "SMALL_CALL_BYTES", made)
    out, meta = Shortcut()(div, (grad, 64), {}, 11), div(grad, 64)
    assert (out.shape, out.stride(), out.dtype) == (meta.shape, meta.stride(), meta.dtype)


@pytest.mark.parametrize(("growth_rate", "image_size"), [(10**18, None), (12, 10**18)])
def test_a_model_far_too_large_is_refused_without_searching_its_prime(monkeypatch, growth_rate, image_size):
    """The simulation's batch is a prime above four times every width and the image size, found by
    trial division up to its square root: for a growth rate or an image size of 10**18 that search
    ran for hours (``plan --growth-rate 1000000000000000000`` hung) before the size check refused
    the model. The batch's floor already refuses it."""
    import densenet_efficient.models.planner.estimate as estimate_module

    def search(*args):
        raise AssertionError("the simulation's prime was searched for")

    monkeypatch.setattr(estimate_module, "simulation_batch", search)
    with pytest.raises(UsageError, match="too large to plan"):
        estimate_memory(densenet_bc_config(40, growth_rate), batch_size=1, image_size=image_size, device="cpu")


def test_a_model_too_large_to_simulate_is_refused_in_one_sentence():
    """Sizes whose simulated tensors would overflow torch's 64-bit storage sizes are refused before
    anything is made; one that only needs the meta kernels (no small call fits memory) is planned."""
    with pytest.raises(UsageError, match=r"densenet121 at 1000000x1000000 is too large to plan: .* image_size"):
        estimate_memory("densenet121", batch_size=1, image_size=10**6, device="cpu")
    with pytest.raises(UsageError, match="too large to plan"):
        max_batch_size(densenet_bc_config(40, 10**9), "8GiB")
    huge = estimate_memory("densenet121", batch_size=1, image_size=100_000, mode="efficient", device="cpu")
    assert huge.total > 2**40  # terabytes: planned, not allocated


def test_the_small_calls_do_not_take_a_size_clamped_by_another_dimension_for_the_batch():
    """A matrix's singular values number ``min(rows, columns)``: with the batch as its rows, that is
    2 and then 7 at the small calls (both below its 16 columns), which read as the batch, but 16 at
    the simulation's batch. The outputs are the op's own at the simulation's batch."""
    shortcut, svd = Shortcut(), torch.ops.aten._linalg_svd.default
    rows = torch.empty(31, 16)
    kwargs = {"full_matrices": False, "compute_uv": False}  # torch.linalg.svdvals, matrix_rank, cond
    out = shortcut(svd, (_meta(rows),), kwargs, 31)
    if out is not NotImplemented:
        assert [o[:3] for o in _outputs(out, [])] == [o[:3] for o in _outputs(svd(_real(rows), **kwargs), [])]


def test_the_shortcut_tells_scalars_of_different_types_apart():
    """``alpha=2`` and ``alpha=2.0`` are equal keys of a dict, but an integer add refuses the float
    one: the shortcut must not answer it with the integer one's outputs."""
    shortcut, add = Shortcut(), torch.ops.aten.add.Tensor
    i = torch.empty(5, 6, 4, 3, dtype=torch.int64, device="meta")
    assert shortcut(add, (i, i), {"alpha": 2}, 7).dtype == torch.int64
    with pytest.raises(Exception, match="alpha"):
        add(torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64), alpha=2.0)
    assert shortcut(add, (i, i), {"alpha": 2.0}, 7) is NotImplemented


def test_the_shortcut_gives_the_op_s_strides_on_maps_with_a_size_one_dimension():
    """A dimension of size 1 leaves a map's memory format ambiguous and its stride free: the op keeps
    a dense input's strides or orders its output by its inputs' strides, which the small call (no
    such dimension) cannot show. The outputs match the real op's, strides included."""
    shortcut, aten = Shortcut(), torch.ops.aten
    w = torch.empty(6)
    contiguous = torch.empty(5, 6, 1, 3)
    nhwc = torch.empty(5, 6, 1, 3).contiguous(memory_format=torch.channels_last)
    transposed = torch.empty(5, 6, 3, 1).transpose(2, 3)  # dense, its H stride 1
    one_image = torch.empty(6, 1, 4, 3).transpose(0, 1)  # dense, its N stride 12
    for func, args in (
        (aten.add.Tensor, (nhwc, contiguous)),
        (aten.add.Tensor, (contiguous, nhwc)),
        (aten._batch_norm_with_update.default, (transposed, w, w, w.clone(), w.clone(), 0.1, 1e-5)),
        (aten._batch_norm_with_update.default, (one_image, w, w, w.clone(), w.clone(), 0.1, 1e-5)),
    ):
        meta = shortcut(func, tree_map(_meta, args), {}, 7)
        if meta is not NotImplemented:
            real = func(*tree_map(_real, args))
            assert [o[:3] for o in _outputs(meta, [])] == [o[:3] for o in _outputs(real, [])], func


def test_the_shortcut_gives_the_op_s_strides_on_nhwc_maps_sliced_with_a_step():
    """Every other channel or column of an NHWC map: its strides in that format's order, but its
    channels (columns) no longer packed inside one column (row). Batch norm's CPU kernel makes its
    output in the format torch suggests for its input, contiguous for these, not the NHWC the
    stride order (and a dense small call) would give."""
    shortcut, aten = Shortcut(), torch.ops.aten
    nhwc = torch.empty(5, 5, 4, 8).contiguous(memory_format=torch.channels_last)
    w = torch.empty(3)
    for x in (nhwc[:, ::2, :, :3], nhwc[:, :3, :, ::3]):  # channels 0, 2, 4 of 5; columns 0, 3, 6 of 8
        args = (x, w, w, w.clone(), w.clone(), 0.1, 1e-5)
        func = aten._batch_norm_with_update.default
        meta = shortcut(func, tree_map(_meta, args), {}, 7)
        if meta is not NotImplemented:
            real = func(*tree_map(_real, args))
            assert [o[:3] for o in _outputs(meta, [])] == [o[:3] for o in _outputs(real, [])], x.stride()


def test_the_shortcut_slices_as_the_op_slices_and_writes_in_place_without_running():
    """``slice`` as one ``as_strided``: the same view (sizes, strides, offset, storage) for every
    kind of bound ``at::slice`` clamps; the in-place ops on phantom tensors return the tensor they
    write, unchanged, without running (``phantom.run``), and real tensors are left to the ops."""
    shortcut, aten = Shortcut(), torch.ops.aten
    x = torch.empty(5, 6, 4, 3, device="meta")[:, 1:]  # a view already: its offset carries over
    cl = torch.empty(5, 6, 4, 3, device="meta").contiguous(memory_format=torch.channels_last)
    for t in (x, cl):
        for args in (
            (1, 0, 2), (1, 2, None), (1, -3, -1), (1, None, 2**63 - 1), (1, 7, 9), (1, 3, 1),
            (-1, 0, 3, 2), (0, -100, 100), (2, 1, 4, 3), (3, -2, None),
        ):  # fmt: skip
            fast, real = shortcut(aten.slice.Tensor, (t, *args), {}, 7), aten.slice.Tensor(t, *args)
            assert _outputs(fast, [t]) == _outputs(real, [t]), args
            assert fast.storage_offset() == real.storage_offset(), args
    px, pcl = phantom(x), phantom(cl)
    for func, args in (
        (aten.add_.Tensor, (px, px)),
        (aten.mul_.Tensor, (pcl, 2.0)),
        (aten.relu_.default, (px,)),
        (aten.copy_.default, (pcl, phantom(x.contiguous(memory_format=torch.channels_last).to(torch.bfloat16)))),
        (aten.zero_.default, (px,)),
        (aten.copy_.default, (px, phantom(torch.empty(7, 9, device="meta")))),  # the meta kernel would refuse
    ):
        assert run(func, args, {}) is args[0], func
    real = torch.ones(3)
    assert run(aten.add_.Tensor, (real, real), {}) is real and real.tolist() == [2.0, 2.0, 2.0]  # it runs
    assert shortcut(aten.slice.Tensor, (real, 0, 1), {}, 7) is NotImplemented
    assert real.tolist() == [2.0, 2.0, 2.0]


def test_the_shortcut_leaves_a_slice_the_op_refuses_to_the_op():
    """A dimension out of range (which ``dim % x.dim()`` would wrap into another dimension's
    slice) and a 0-dim tensor (a modulo by zero) raise the op's own error, not a wrong view."""
    shortcut, slice_ = Shortcut(), torch.ops.aten.slice.Tensor
    x, scalar = torch.empty(5, 6, 4, 3, device="meta"), torch.empty((), device="meta")
    for t, args in ((x, (4, 0, 2)), (x, (-5, 0, 2)), (scalar, (0, 0, 1))):
        assert shortcut(slice_, (t, *args), {}, 7) is NotImplemented, args
        with pytest.raises((IndexError, RuntimeError), match="range|0-dim"):
            slice_(t, *args)


@pytest.mark.parametrize(
    ("shape", "weight", "stride", "padding", "fmt"),
    [
        ((2, 3, 33, 31), (64, 3, 7, 7), 2, 3, torch.contiguous_format),  # the ImageNet stem
        ((2, 40, 9, 9), (48, 40, 1, 1), 1, 0, torch.channels_last),
        ((2, 48, 9, 9), (12, 48, 3, 3), 1, 1, torch.contiguous_format),
        ((2, 48, 9, 9), (12, 48, 3, 3), 1, 1, torch.channels_last),
    ],
)
def test_phantom_convolutions_are_shaped_and_laid_out_as_the_real_ones(shape, weight, stride, padding, fmt):
    """The conv rules (the meta kernel leaves every output contiguous): outputs and gradients of the
    sizes, dtypes and memory formats of ATen's CPU convolution on the same tensors."""
    x = torch.randn(shape).contiguous(memory_format=fmt)
    w = torch.randn(weight).contiguous(memory_format=fmt).requires_grad_()
    xp = phantom(_meta(x)).requires_grad_()
    wp = phantom(_meta(w)).requires_grad_()
    real = F.conv2d(x.requires_grad_(), w, stride=stride, padding=padding)
    fake = F.conv2d(xp, wp, stride=stride, padding=padding)
    assert (fake.shape, fake.stride(), fake.dtype) == (real.shape, real.stride(), real.dtype)
    real.backward(torch.ones_like(real))
    fake.backward(phantom(_meta(torch.ones_like(real))))
    for r, f in ((x.grad, xp.grad), (w.grad, wp.grad)):
        assert (f.shape, f.dtype, f.device) == (r.shape, r.dtype, r.device)


def test_a_simulation_does_not_import_torch_s_compiler():
    """The point of phantom tensors over torch's fake ones: a fresh process answers without
    importing ``torch._dynamo`` (about a second), which making a ``FakeTensorMode``, torch's
    optimizer classes and its Python decompositions each do; nor ``torch.distributed.tensor``
    (0.4 s), which torch imports at the first op a tensor subclass handles itself (phantom
    tensors are worked on under a dispatch mode); nor sympy (0.2 s), which torch's Python meta
    kernels import (their ops are read off small real calls). On the CPU and on CUDA (whose Adam
    runs foreach ops), in mixed precision."""
    code = (
        "import sys; from densenet_efficient.models.planner import max_batch_size; "
        "print(max_batch_size('densenet_bc_16', '1GiB', device='cpu', optimizer='adam', amp='bf16'), "
        "max_batch_size('densenet_bc_16', '1GiB', device='cuda', optimizer='adamw', amp='fp16', channels_last=True), "
        "*(m in sys.modules for m in ('torch._dynamo', 'torch.distributed.tensor', 'sympy')))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    cpu, cuda, *imported = out.stdout.split()
    assert int(cpu) > 1 and int(cuda) > 1 and imported == ["False", "False", "False"]


def test_phantom_tensors_make_what_the_ops_make_and_real_ones_stay_real():
    """Factories and ops on phantom tensors give phantom tensors on the same device; an in-place op
    returns the tensor it was given; ops on ordinary tensors alone run for real."""
    x = phantom(torch.empty(4, 3, device="meta"))
    assert isinstance(x * 2, Phantom) and (x * 2).device.type == "cpu"
    assert x.add_(1) is x and x.shape == (4, 3)
    step = torch.tensor(0.0)
    step += 1  # the optimizer's step count: real, read on the host
    assert step.item() == 1.0
    mixed = x + torch.tensor(2.0)
    assert isinstance(mixed, Phantom) and mixed.shape == (4, 3)
    assert repr(x) == "Phantom((4, 3), dtype=torch.float32, device=cpu)"


def test_an_op_is_told_from_an_earlier_op_that_was_freed():
    """What is known of an op (:func:`.phantom.per_op`) is looked up by its identity: an op of a
    library that is gone (``torch.library`` scoped libraries, a test's custom ops) is freed, and a
    new op may then take its identity; it must not be answered as the old one (an in-place op's
    answer for an op that makes a new tensor: its input returned, nothing made)."""
    answers = []
    for i in range(60):
        with torch.library._scoped_library("densenet_efficient_test_per_op", "FRAGMENT") as lib:
            lib.define(f"op{i}(Tensor(a!) self) -> Tensor(a!)" if i % 2 else f"op{i}(Tensor self) -> Tensor")
            answers.append(values_only(getattr(torch.ops.densenet_efficient_test_per_op, f"op{i}").default))
    assert answers == [bool(i % 2) for i in range(60)]


def test_in_place_ops_that_change_a_tensor_s_size_or_storage_are_not_read_as_writing_values():
    """An in-place op that only writes values returns its phantom tensor without running; those
    that resize or re-point it (tagged ``inplace_view`` or not), or write elsewhere, are not read so."""
    aten = torch.ops.aten
    for op in (aten.add_.Tensor, aten.copy_.default, aten.lerp_.Scalar, aten._foreach_add_.List, aten.zero_.default):
        assert values_only(op), op
    for op in (aten.resize_.default, aten.set_.source_Tensor, aten.unsqueeze_.default, aten.as_strided_.default,
               aten._resize_output_.default, aten.shallow_copy_data_.default, aten.add.out, aten.add.Tensor):
        assert not values_only(op), op


def test_an_op_that_writes_a_phantom_s_values_into_a_real_tensor_refuses():
    """A real tensor cannot hold what a phantom one computes: an in-place op on it, or an ``out=``
    it is, with a phantom argument says so, where it returned the real tensor unchanged (its
    values not written, an ``out=`` not resized) and counted a copy of it as a new storage."""
    x = phantom(torch.empty(4, 3, device="meta"))
    real, out = torch.zeros(4, 3), torch.zeros(0)
    with pytest.raises(RuntimeError, match="real tensor"):
        real.add_(x)
    with pytest.raises(RuntimeError, match="real tensor"):
        torch.mul(x, 2, out=out)
    assert out.shape == (0,) and real.tolist() == [[0.0] * 3] * 4
    live = LiveBytes(7, shortcut=Shortcut(), phantom=True)
    with live, pytest.raises(RuntimeError, match="real tensor"):
        real.mul_(x)
    assert isinstance(x.add_(real), Phantom)  # a real tensor read beside a phantom one


def test_a_simulation_that_raises_leaves_the_cached_model_as_it_was(monkeypatch):
    """The simulated model is cached per process: a step that raises (here in the loss) leaves no
    hook on its blocks and no gradient on its parameters, and the next simulation is whole."""
    config = densenet_bc_config(16)
    plan = resolve_memory_plan("efficient", config)
    expected = simulate(config, plan, image_size=32)

    def broken(*args, **kwargs):
        raise RuntimeError("the loss failed")

    monkeypatch.setattr(simulate_module.F, "cross_entropy", broken)
    with pytest.raises(RuntimeError, match="the loss failed"):
        simulate(config, plan, image_size=32)
    monkeypatch.undo()
    model = simulate_module._phantom_model(config, None, "fp32", False, False)  # the one simulate used
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert simulate(config, plan, image_size=32) == expected
    assert simulate(config, "efficient", image_size=32) == expected  # a mode's name: the same setting


def test_a_simulation_leaves_the_garbage_collector_as_it_found_it():
    """The collector is off while a step is simulated (a collection there only scans torch's own
    objects), and on or off afterwards as it was, also when the step raises."""
    import gc

    config = densenet_bc_config(16)
    seen = []
    original = simulate_module._simulate

    def spying(*args, **kwargs):
        seen.append(gc.isenabled())
        return original(*args, **kwargs)

    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(simulate_module, "_simulate", spying)
                simulate(config, "max_saving", image_size=32)
            assert gc.isenabled() is enabled
        finally:
            gc.enable()
    assert seen == [False, False]


def test_the_simulated_model_is_built_without_initialising_its_parameters():
    """Building the simulated model on the meta device runs none of torch.nn.init's ops (Python
    decompositions on meta tensors), and makes every parameter and buffer all the same."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from densenet_efficient.models.registry import model_class

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.__name__)
            return func(*args, **(kwargs or {}))

    with torch.device("meta"), Ops() as plain:
        reference = model_class()(**BC40.to_kwargs())
    with torch.device("meta"), simulate_module._Uninitialised(), Ops() as uninitialised:
        built = model_class()(**BC40.to_kwargs())
    assert {"normal_.default", "fill_.Scalar", "zero_.default"} & plain.names  # what init runs
    assert not {name for name in uninitialised.names if name.endswith("_.default") or "fill_" in name}
    assert [(n, t.shape, t.dtype) for n, t in built.state_dict().items()] == [
        (n, t.shape, t.dtype) for n, t in reference.state_dict().items()
    ]


@pytest.mark.parametrize("amp", [None, "bf16"])
def test_composed_plans_match_their_whole_simulation(amp):
    """The search's composition: exact for the uniform modes, within 2% (and not below by more than
    1%) for plans keeping some bottlenecks, checked against simulating those plans whole."""
    eff, ms = (simulation(BC40, MemoryPlan.uniform(m, 3), 32, amp=amp) for m in ("efficient", "max_saving"))
    composer = Composer(eff, ms, BC40.block_config)
    for b in (1, 64):
        assert composer.peak((6, 6, 6), False, b) == eff.peak(b)
        assert composer.peak((0, 0, 0), False, b) == ms.peak(b)  # a CIFAR stem has no mode
    for keeps in ((3, 6, 6), (0, 2, 6), (6, 0, 1), (2, 2, 2)):
        whole = simulation(BC40, resolve_memory_plan(list(keeps), BC40), 32, amp=amp)
        for b in (8, 64):
            composed, real = composer.peak(keeps, False, b), whole.peak(b)
            assert 0.99 * real <= composed <= 1.02 * real, (keeps, b, composed, real)


def test_max_batch_size_is_the_largest_that_fits():
    budget = parse_memory("400MiB")
    for mode in ("naive", "efficient", "max_saving"):
        n = max_batch_size("densenet_bc_40", budget, mode=mode, device="cpu")
        assert estimate_memory("densenet_bc_40", batch_size=n, mode=mode, device="cpu").total <= budget
        assert estimate_memory("densenet_bc_40", batch_size=n + 1, mode=mode, device="cpu").total > budget


def test_max_batch_size_too_small_budget_names_minimum():
    with pytest.raises(ValueError, match=r"fits no batch.*at least \d"):
        max_batch_size("densenet_bc_40", "64MiB", device="cpu")


def test_fit_memory_answers_from_one_simulation_when_nothing_needs_recomputing(monkeypatch):
    """A budget the efficient setting fits: that plan (no recomputation, which the search could
    only find again), from its simulation alone; a budget it does not fit prices plans from the
    max_saving simulation too."""
    from densenet_efficient.models.planner import estimate as estimate_module

    simulated = []

    def recording(config, setting, **kwargs):
        simulated.append(setting.blocks)
        return simulate(config, setting, **kwargs)

    monkeypatch.setattr(estimate_module, "simulate", recording)
    config = densenet_bc_config(16, growth_rate=8)  # simulated by no other test: nothing cached
    roomy = fit_memory(config, "4GiB", batch_size=8, device="cpu")
    assert roomy.blocks == ("efficient",) * 3 and roomy.estimated_extra_time == 0.0
    assert simulated == [("efficient",) * 3]
    efficient = estimate_memory(config, batch_size=64, device="cpu").total
    tight = fit_memory(config, int(efficient * 0.97), batch_size=64, device="cpu")
    assert tight.estimated_extra_time > 0 and ("max_saving",) * 3 in simulated


def test_the_optimizer_runs_as_torch_builds_it_on_the_device():
    """On CUDA torch's optimizers default to ``foreach``: Adam's square roots are alive for every
    parameter at once (at a small batch that is the step's peak); on CPU they loop over the
    parameters, one temporary at a time. SGD with momentum updates in place on both."""
    eff = resolve_memory_plan("efficient", BC40)

    def above_persistent(optimizer, device):
        sim = simulation(BC40, eff, 32, optimizer=optimizer, device=device)
        return max(ln.at(1) for ln in sim.optimizer) - sim.persistent.at(1), sim.parameters

    cuda, params = above_persistent("adam", "cuda")
    cpu, _ = above_persistent("adam", "cpu")
    assert cuda >= params > 4 * cpu
    assert above_persistent("momentum", "cuda")[0] == above_persistent("momentum", "cpu")[0] == 0


def test_every_entry_point_refuses_a_model_too_deep_to_simulate_before_simulating(monkeypatch):
    """A DenseNet-BC of 6003 dense layers: one sentence naming the limit, from each function,
    without simulating (a simulation of it would run for minutes)."""
    from densenet_efficient.models.planner import estimate as estimate_module

    def no_simulation(*args, **kwargs):
        raise AssertionError("simulated a model beyond the limit")

    monkeypatch.setattr(estimate_module, "simulate", no_simulation)
    deep = densenet_bc_config(6 * 2001 + 4)
    calls = (
        lambda: estimate_memory(deep, batch_size=1),
        lambda: max_batch_size(deep, "80GiB"),
        lambda: fit_memory(deep, "80GiB", batch_size=1),
    )
    for call in calls:
        with pytest.raises(UsageError, match="6003 dense layers: the planner simulates the step op by op, at most 6000"):
            call()


def test_fit_memory_is_tight_and_refuses_only_below_max_saving():
    low, high = (
        estimate_memory("densenet_bc_40", batch_size=64, mode=m, device="cpu").total
        for m in ("max_saving", "efficient")
    )
    for share in (0.0, 0.3, 0.7):
        budget = low + int((high - low) * share)
        plan = fit_memory("densenet_bc_40", budget, batch_size=64, device="cpu")
        assert plan.estimated_peak <= budget
        real = estimate_memory("densenet_bc_40", batch_size=64, mode=plan, device="cpu").total
        assert real == plan.estimated_peak
    with pytest.raises(MemoryBudgetError, match="even in max_saving mode") as err:
        fit_memory("densenet_bc_40", low - 1, batch_size=64, device="cpu")
    assert err.value.floor == low


@pytest.mark.xdist_group("measured")
def test_a_fitted_plan_measures_within_its_budget():
    """The one real measurement: the plan fit_memory picks for a budget between the max_saving and
    efficient steps, run as the whole-step protocol runs it (fresh process, two SGD steps)."""
    low, high = (
        estimate_memory("densenet_bc_40", batch_size=64, mode=m, device="cpu").total
        for m in ("max_saving", "efficient")
    )
    budget = (low + high) // 2
    plan = fit_memory("densenet_bc_40", budget, batch_size=64, device="cpu")
    spec = StepSpec("efficient", BC40, 64, 32, kind="whole_step", memory_plan=plan.to_json(), threads=1)
    result = measure_series([spec])[0]
    assert result["environment"] == MEMORY_ENV  # glibc and MKL return freed memory: docs/planner.md
    measured = result["peak_bytes"]
    assert 0.9 * budget <= measured <= budget, (plan, measured / budget)


def test_the_grid_table_shows_the_saved_measurements():
    """docs/planner.md's grid: every row's measured step is the one docs/planner_grid.json keeps
    for its setting and plan (what ``scripts/planner_grid.py --reuse`` reads), all 42 of them."""
    saved = {r["key"]: r["measured"] for r in json.loads((REPO / "docs" / "planner_grid.json").read_text())["rows"]}
    text = (REPO / "docs" / "planner.md").read_text(encoding="utf-8").partition("## The measured grid")[2]
    table = text[text.index("\n|") + 1 :].partition("\n\n")[0]  # the section's first table
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| densenet")]
    assert len(rows) == 42
    for label, plan, _, measured, *_ in rows:
        key = f"{label.removeprefix('| ')} | {plan}"
        assert key in saved, key
        assert measured == format_bytes(saved[key]), key

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
    ("bad", "shown"),
    [(10**5000, "an integer of about 5001 digits"), ("9" * 5000 + "GiB", "'99999"), ("x" * 5000, "'xxxxx")],
    ids=["huge-int", "huge-number", "long-text"],
)
def test_parse_memory_shows_a_huge_value_in_a_line(bad, shown):
    with pytest.raises(ValueError, match="memory budget must") as err:
        parse_memory(bad)
    assert shown in str(err.value) and len(str(err.value)) < 200


def test_parse_memory_reads_a_float_as_its_exact_bytes():
    """A float budget is its value, whatever Python prints for it (``1e16`` was refused as
    '1e+16'), a fraction of a byte dropped as a string's is; NaN and infinity are no size."""
    assert parse_memory(1e16) == 10**16 and parse_memory(8e9) == 8 * 10**9
    assert parse_memory(1.5) == parse_memory("1.5") == 1
    for bad in (float("nan"), float("inf"), 0.5, True):
        with pytest.raises(UsageError, match="memory budget must"):
            parse_memory(bad)


@pytest.mark.parametrize(
    ("n", "text"),
    [(2**64, "16 EiB"), (7.45 * 2**40, "7.45 TiB"), (3 * 2**50, "3 PiB"), (1023 * 2**30, "1023 GiB"),
     (float("nan"), "nan B"), (float("inf"), "inf B")],
)  # fmt: skip
def test_format_bytes_says_any_size_in_one_short_figure(n, text):
    """A terabyte estimate reads as TiB, not thousands of GiB; a non-number is said, not raised."""
    assert format_bytes(n) == text


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


def test_plan_modes_is_a_sequence_of_modes_not_one_string():
    """``modes="naive"`` was iterated letter by letter: "memory_efficient must be ..., got 'n'"."""
    with pytest.raises(UsageError, match=r"^modes must be a tuple of modes, e.g. \('naive',\), found 'naive'$"):
        de.models.planner.plan("densenet_bc_40", "1GiB", modes="naive", device="cpu")


@pytest.mark.parametrize("bad", ["no", "False", 1, 0, None, []])
def test_channels_last_is_true_or_false(bad):
    """``channels_last="no"`` was read as True (``bool("no")``) and priced silently."""
    for call in (
        lambda: estimate_memory("densenet_bc_40", batch_size=2, channels_last=bad),
        lambda: max_batch_size("densenet_bc_40", "1GiB", channels_last=bad),
        lambda: fit_memory("densenet_bc_40", "1GiB", batch_size=2, channels_last=bad),
    ):
        with pytest.raises(UsageError, match=r"^channels_last must be True or False, found"):
            call()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--arch", "densenet999", "--memory", "8GiB"], "unknown architecture 'densenet999'"),
        (["--memory", "lots"], "memory budget must look like"),
        (["--image-size", "-1", "--memory", "8GiB"], "image_size must be an integer >= 1, found -1"),
        (["--depth", "10", "--growth-rate", "0", "--memory", "8GiB"], "growth_rate must be >= 1, got 0"),
        (["--depth", "41", "--memory", "8GiB"], "6n\\+4"),
        (["--memory", "8GiB", "--sync-bn", "0"], "--sync-bn takes the number of processes, 1 to 1048576, found 0"),
        (["--memory", "8GiB", "--sync-bn", "10" * 10], "--sync-bn takes the number of processes, 1 to 1048576, found"),
    ],
)
def test_plan_cli_errors_exit_2(argv, message, capsys):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_plan_cli_json_matches_api(capsys):
    argv = ["plan", "--depth", "40", "--memory", "2GB", "--mode", "efficient", "--device", "cpu"]
    assert main([*argv, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["mode"] for r in rows] == ["efficient"]
    assert rows[0]["max_batch_size"] == max_batch_size(
        "densenet_bc_40", "2GB", mode="efficient", device="cpu"
    )
    # the step's layout and dropout, as train --channels-last --drop-rate runs it
    assert main([*argv, "--channels-last", "--drop-rate", "0.2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    options = {"mode": "efficient", "device": "cpu", "channels_last": True, "drop_rate": 0.2}
    assert rows[0]["max_batch_size"] == max_batch_size("densenet_bc_40", "2GB", **options)
    assert rows[0]["max_batch_size"] != max_batch_size("densenet_bc_40", "2GB", mode="efficient", device="cpu")


def test_plan_cli_plans_this_package_s_modes_and_torchvision_s_when_asked(capsys):
    """The three modes by default; ``--torchvision`` adds torchvision's DenseNet, plain and
    ``memory_efficient=True``, after the modes asked for (each once)."""
    argv = ["plan", "--depth", "16", "--memory", "1GB", "--device", "cpu", "--json"]
    assert main(argv) == 0
    assert [r["mode"] for r in json.loads(capsys.readouterr().out)["rows"]] == ["naive", "efficient", "max_saving"]
    assert main([*argv, "--mode", "efficient", "--mode", "efficient", "--torchvision"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["mode"] for r in rows] == ["efficient", "torchvision", "torchvision_efficient"]
    assert rows[1]["per_image"] > rows[0]["per_image"]  # torchvision's naive DenseNet keeps more


def test_plan_cli_says_why_fit_memory_fails_at_a_batch_over_the_budget(capsys):
    """``--batch-size`` beyond what even max_saving fits: the table is printed and the fit line says
    why (it once raised KeyError: 'summary', the default of ``dict.get`` being evaluated first)."""
    argv = ["plan", "--depth", "40", "--memory", "1GiB", "--mode", "efficient", "--device", "cpu"]
    assert main([*argv, "--batch-size", "5000"]) == 0
    out = capsys.readouterr().out
    assert "fit_memory at batch 5000: 1 GiB is below what densenet_bc_40 needs for a batch of 5000" in out


def test_plan_cli_plans_synchronised_batch_norm(capsys):
    argv = ["plan", "--depth", "40", "--memory", "2GB", "--mode", "efficient", "--device", "cpu", "--json"]
    assert main([*argv, "--sync-bn", "4"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows[0]["max_batch_size"] == max_batch_size(
        "densenet_bc_40", "2GB", mode="efficient", device="cpu", sync_bn_world_size=4
    )
    assert main(argv) == 0
    plain = json.loads(capsys.readouterr().out)["rows"]
    assert rows[0]["per_image"] > plain[0]["per_image"]  # the synchronised backward's temporaries


def test_bisection_finds_the_boundary_with_log_calls():
    calls = []

    def fits(n):
        calls.append(n)
        return n <= 10**18

    assert last_true(fits, 1) == 10**18 and len(calls) < 130
    assert first_true(lambda i: i >= 7, 0, 7) == 7 and first_true(lambda i: i >= 3, 0, 7) == 3
    assert last_true(lambda n: n <= 5, 2, 9) == 5 and last_true(lambda n: n <= 5, 5, 5) == 5


@pytest.mark.parametrize(
    "cost",
    [
        lambda n: 2.4e6 * n * n + 3e8 * n + 6e8,  # a DenseNet-BC step's bytes against n, roughly
        lambda n: 100 + 5 * n,
        lambda n: n**3,
        lambda n: 2 ** min(n, 60),  # far from any parabola
        lambda n: 50 * n + (n // 7) * 30,  # steps
        lambda n: 10**12 if n > 40 else n,  # a wall
    ],
)
def test_guided_search_gives_bisections_answer_and_simulates_less_depth(cost):
    budget = 12e9
    tried: list[int] = []

    def counted(n):
        tried.append(n)
        return cost(n)

    expected = last_true(lambda n: cost(n) <= budget, 1, 5000)
    assert last_within(counted, budget, 1, 5000) == expected
    bisected: list[int] = []
    last_true(lambda n: bisected.append(n) or cost(n) <= budget, 1, 5000)
    assert len(tried) <= 2 * len(bisected) + 4 and max(tried) <= max(4 * expected + 4, expected + 1)
    assert last_within(cost, budget, 1, min(expected, 30)) == min(expected, 30)  # the limit fits


# -- one name and one default per idea ---------------------------------------------------------------


def test_image_size_is_the_one_name_of_the_input_size():
    """No release has shipped ``resolution``: the planner's functions refuse it as an unknown
    keyword, and an estimate and its JSON carry ``image_size`` only."""
    new = estimate_memory("densenet_bc_40", batch_size=4, image_size=40)
    assert new.image_size == 40 and "resolution" not in new.to_dict() and not hasattr(new, "resolution")
    for call in (
        lambda: estimate_memory("densenet_bc_40", batch_size=4, resolution=40),
        lambda: max_batch_size("densenet_bc_40", "8GiB", resolution=40),
        lambda: fit_memory("densenet_bc_40", "2GiB", batch_size=8, resolution=40),
    ):
        with pytest.raises(TypeError, match="resolution"):
            call()


def test_one_optimizer_default_everywhere():
    model = de.densenet_bc(40)
    by_method = model.fit_memory("380MiB", batch_size=64, device="cpu")
    by_function = de.fit_memory("densenet_bc_40", "380MiB", batch_size=64, device="cpu")
    with_momentum = de.fit_memory(
        "densenet_bc_40", "380MiB", batch_size=64, device="cpu", optimizer="momentum"
    )
    assert by_method == by_function == with_momentum
    assert model.memory_plan == by_method
    est = estimate_memory("densenet_bc_40", batch_size=8)
    assert est.optimizer_state == est.gradients  # one momentum buffer per parameter
    assert estimate_memory("densenet_bc_40", batch_size=8, optimizer="sgd").optimizer_state == 0
    adam = estimate_memory("densenet_bc_40", batch_size=8, optimizer="adam")
    assert adam.optimizer_state >= 2 * est.gradients  # two buffers per parameter (and Adam's steps)


# -- verify=True -------------------------------------------------------------------------------------


def test_a_channels_last_model_is_planned_channels_last():
    """``model.fit_memory`` plans the step in the model's layout, as it does in its dtype: a model
    converted to channels_last gets the channels_last step's plan (on CPU it holds less)."""
    model = de.densenet_bc(40)
    low, high = (
        estimate_memory(BC40, batch_size=64, mode=m, device="cpu", channels_last=True).total
        for m in ("max_saving", "efficient")
    )
    budget = (low + high) // 2
    wanted = fit_memory(BC40, budget, batch_size=64, device="cpu", channels_last=True)
    assert wanted != fit_memory(BC40, budget, batch_size=64, device="cpu")  # the layouts differ here
    assert model.fit_memory(budget, batch_size=64, device="cpu") != wanted  # NCHW: the contiguous plan
    model = model.to(memory_format=torch.channels_last)
    assert model.fit_memory(budget, batch_size=64, device="cpu") == wanted


def test_dropout_is_planned_with_its_masks():
    """``drop_rate`` (the model's dropout after each dense layer) is simulated: the step keeps a
    mask per layer, in every mode and in torchvision's DenseNet; ``model.fit_memory`` plans the
    model's own rate, as it does its dtype."""
    for mode in ("naive", "efficient", "max_saving", "torchvision_efficient"):
        plain, dropped = (
            estimate_memory(BC40, batch_size=64, mode=mode, device="cpu", drop_rate=p) for p in (0.0, 0.2)
        )
        assert dropped.total > plain.total, mode
    model = de.densenet_bc(40, drop_rate=0.2)
    low = estimate_memory(BC40, batch_size=64, mode="max_saving", device="cpu", drop_rate=0.2).total
    wanted = fit_memory(BC40, low + (2 << 20), batch_size=64, device="cpu", drop_rate=0.2)
    assert model.fit_memory(low + (2 << 20), batch_size=64, device="cpu") == wanted
    with pytest.raises(UsageError, match=r"drop_rate must be a number in \[0, 1\), found 1.5"):
        estimate_memory(BC40, batch_size=64, drop_rate=1.5)


def test_frozen_features_are_planned_as_only_the_classifier_trains():
    """``freeze_features`` (``train --freeze-features``): the features take no gradient and keep
    their batch statistics, so backward stops at the classifier: gradients and optimizer state are
    the classifier's, and the step holds a fraction of a full one. ``fit_memory`` has no plan to
    search between "efficient" and the floor there; ``model.fit_memory`` reads the freezing off
    the model, as it reads its dtype."""
    classifier = sum(p.numel() * 4 for p in de.densenet_bc(40).classifier.parameters())
    for mode in ("naive", "efficient", "max_saving"):
        full, frozen = (
            estimate_memory(BC40, batch_size=64, mode=mode, device="cpu", freeze_features=f) for f in (False, True)
        )
        assert frozen.gradients == frozen.optimizer_state == classifier
        assert frozen.total < 0.8 * full.total, mode
    # nothing is kept for a backward that does not come: no setting between them changes the step
    # (the engine's reference kept "efficient"'s bottlenecks anyway: 52 MiB more, unlike the native op)
    efficient, max_saving = (
        estimate_memory(BC40, batch_size=64, mode=m, device="cpu", freeze_features=True) for m in ("efficient", "max_saving")
    )
    assert efficient.total == max_saving.total
    options = {"batch_size": 64, "device": "cpu", "freeze_features": True}
    least = estimate_memory(BC40, mode="max_saving", **options).total
    assert fit_memory(BC40, least, **options).estimated_peak <= least
    with pytest.raises(MemoryBudgetError, match="even in max_saving mode"):
        fit_memory(BC40, least - 1, **options)
    model = de.densenet_bc(40)
    model.features.requires_grad_(False)
    assert model.fit_memory("1GiB", batch_size=64, device="cpu") == fit_memory(BC40, "1GiB", **options)
    with pytest.raises(UsageError, match="freeze_features must be True or False, found 'yes'"):
        estimate_memory(BC40, batch_size=64, freeze_features="yes")


def test_frozen_features_recompute_nothing():
    """Recomputation happens in backward, and with the features frozen no backward runs through
    them: every setting's step is the same one, with no extra time (``max_saving`` was priced at
    +11.5%, in ``estimate_memory``, ``plan`` and the plan ``fit_memory`` returns)."""
    options = {"batch_size": 64, "device": "cpu", "freeze_features": True}
    for mode in ("naive", "efficient", "max_saving"):
        assert estimate_memory(BC40, mode=mode, **options).extra_time == 0.0, mode
    plan = fit_memory(BC40, estimate_memory(BC40, mode="max_saving", **options).total, **options)
    assert plan.estimated_extra_time == 0.0
    # the same step in every setting: a budget it fits only without FIT_SHARE's margin keeps the
    # plan a larger budget gets ("efficient"), not "max_saving"
    assert (plan.blocks, plan.stem) == (fit_memory(BC40, "1GiB", **options).blocks, "efficient")


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
        estimate_memory("densenet_bc_40", batch_size=64, mode=m).total for m in ("max_saving", "efficient")
    )
    budget = (low + high) // 2

    def fit(b):
        return fit_memory("densenet_bc_40", b, batch_size=64, device="cuda")

    unseen = 30 << 20  # what a GPU adds that the planner does not count (fragmentation, cuDNN)
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
