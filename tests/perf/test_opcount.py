"""Kernel-launching ops per step: the engine issues no more than torchvision (docs/measurement.md).

Counts are deterministic, so these are exact assertions, not timings: the ratio to torchvision
on the two models the project is measured on, and the marginal cost of one dense layer, which
is the engine's own structure (torch's composite ops do not enter it).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import densenet_efficient as de
from densenet_efficient.models.config import resolve_arch
from densenet_efficient.perf.measure import build_implementation
from densenet_efficient.perf.opcount import OpCounter, count_inference_ops, count_step_ops, launches_kernel

ENGINE = ["efficient", "max_saving"]
# The issue's measuring points: densenet121 at batch 2, 64 px; DenseNet-BC-100 at batch 2, 32 px.
POINTS = {"densenet121": 64, "densenet_bc_100": 32}


def _input(arch: str, channels_last: bool = False) -> torch.Tensor:
    x = torch.randn(2, 3, POINTS[arch], POINTS[arch])
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _model(impl: str, arch: str, channels_last: bool = False) -> torch.nn.Module:
    model = build_implementation(impl, resolve_arch(arch))
    return model.to(memory_format=torch.channels_last) if channels_last else model


@pytest.fixture(scope="module")
def torchvision_counts() -> dict:
    """torchvision's counts, each measured once for the module."""
    out = {}
    for arch in POINTS:
        out[arch, "fp32"] = count_step_ops(_model("torchvision", arch), _input(arch))
        out[arch, "bf16"] = count_step_ops(_model("torchvision", arch), _input(arch), autocast=torch.bfloat16)
        out[arch, "eval"] = count_inference_ops(_model("torchvision", arch), _input(arch))
    return out


@pytest.mark.parametrize("arch", POINTS)
def test_training_step_issues_no_more_ops_than_torchvision(arch, torchvision_counts):
    """On CPU: the default mode at or below torchvision's count, fp32 and bf16; max_saving's 1x1
    recompute adds one op per layer, within 4% of torchvision's (its CPU copies, see above)."""
    tv = torchvision_counts[arch, "fp32"]
    ours = count_step_ops(_model("efficient", arch), _input(arch))
    assert ours.total <= tv.total and ours.backward <= tv.backward, (ours, tv)
    most = count_step_ops(_model("max_saving", arch), _input(arch))
    assert most.total <= 1.04 * tv.total and most.backward <= tv.backward, (most, tv)
    for mode in ENGINE:
        low = count_step_ops(_model(mode, arch), _input(arch), autocast=torch.bfloat16)
        assert low.total <= torchvision_counts[arch, "bf16"].total, (mode, low)


@pytest.mark.parametrize("mode", ENGINE)
def test_channels_last_adds_no_ops_inside_the_engine(mode):
    """channels_last costs the engine no layout conversions: what it adds to a step (in the stem
    and head, outside the engine) is what it adds to torchvision's."""
    arch = "densenet_bc_100"
    extra = {}
    for impl in ("torchvision", mode):
        nchw = count_step_ops(_model(impl, arch), _input(arch))
        nhwc = count_step_ops(_model(impl, arch, True), _input(arch, True))
        extra[impl] = nhwc.total - nchw.total
    assert extra[mode] == extra["torchvision"], extra


def test_dial_settings_stay_below_torchvision(torchvision_counts):
    """A per-block and a per-layer setting (the dial) sit between the two modes' counts."""
    config = resolve_arch("densenet121")
    plans = [
        ["efficient", 6, "max_saving", "efficient"],
        de.MemoryPlan(tuple(tuple(i % 2 == 0 for i in range(n)) for n in config.block_config), "max_saving"),
    ]
    for plan in plans:
        model = de.DenseNet(**config.to_kwargs(), memory_efficient=plan)
        ours = count_step_ops(model, _input("densenet121"))
        assert ours.total <= torchvision_counts["densenet121", "fp32"].total, plan


@pytest.fixture
def cuda_path(monkeypatch):
    """The engine's CUDA code path, counted on this CPU: the one device-dependent choice (BN with
    fixed statistics on a dense copy, CPU, or on the strided view, CUDA) switched to CUDA's."""
    from densenet_efficient.models.engine import context

    monkeypatch.setattr(context, "copies_for_dense_kernel", lambda device: False)


@pytest.mark.parametrize("arch", POINTS)
def test_the_cuda_path_issues_fewer_ops_than_torchvision_in_every_mode(arch, torchvision_counts, cuda_path):
    """Every mode's training step and inference at or below torchvision's count (on CPU the
    engine adds one dense copy per layer to the forward and one to the backward, see docs)."""
    for mode in ENGINE:
        ours = count_step_ops(_model(mode, arch), _input(arch))
        assert ours.total <= torchvision_counts[arch, "fp32"].total, (mode, ours)
        assert ours.forward <= torchvision_counts[arch, "fp32"].forward + 16, (mode, ours)
        low = count_step_ops(_model(mode, arch), _input(arch), autocast=torch.bfloat16)
        assert low.total <= torchvision_counts[arch, "bf16"].total, (mode, low)
        assert count_inference_ops(_model(mode, arch), _input(arch)).total <= torchvision_counts[arch, "eval"].total


def _marginal(mode: str, count) -> tuple[int, ...]:
    """Ops of one more dense layer: a 3-layer block minus a 2-layer block (same everything else)."""
    figures = []
    for layers in (2, 3):
        model = de.DenseNet(
            growth_rate=4, block_config=(layers,), num_init_features=8, num_classes=3,
            small_inputs=True, memory_efficient=mode,
        )
        figures.append(count(model))
    return tuple(b - a for a, b in zip(*figures, strict=True))


@pytest.mark.parametrize("mode,backward", [("efficient", 13), ("max_saving", 14)])
def test_one_dense_layer_costs_a_fixed_number_of_ops(mode, backward):
    """Per layer: forward 10 on CPU (torchvision issues 9: cat, two BN, two ReLU, two convs and two
    counter increments; the engine issues no cat and one counter increment per block, but the
    statistics of the new channels, 2, and on CPU a dense copy for the BN kernel, 1); backward 13
    (the CPU copy again, and the dense copy of the input that BN backward reads; +1 when the 1x1
    convolution is recomputed); inference 8 (torchvision 7 + the CPU copy)."""
    x = torch.randn(2, 3, 8, 8)

    def step(model):
        s = count_step_ops(model, x)
        return s.forward, s.backward

    assert _marginal(mode, step) == (10, backward)
    assert _marginal(mode, lambda m: (count_inference_ops(m, x).total,)) == (8,)


def test_a_training_step_never_reads_a_tensor_on_the_host():
    """No ``.item()`` / ``float(tensor)`` in a step, ``momentum=None`` included: capturable in a CUDA
    graph and never stalls the GPU queue."""
    model = de.densenet_bc(16, memory_efficient=True)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    stem = de.DenseNet(growth_rate=4, block_config=(1, 1), num_init_features=8, num_classes=3,
                       memory_efficient="max_saving")
    for net, size in ((model, 16), (stem, 32)):
        x, y = torch.randn(2, 3, size, size), torch.zeros(2, dtype=torch.long)
        with OpCounter() as c:
            F.cross_entropy(net(x), y).backward()
        assert c.by_op["_local_scalar_dense"] == 0
        assert c.total > 0


def test_the_counter_skips_views_and_allocations():
    with OpCounter() as c:
        x = torch.empty(4, 4)
        x.fill_(1.0)
        x[:, :2].t()
        x.add_(1)
    assert c.total == 2, c.by_op
    assert not launches_kernel(torch.ops.aten.promote_types.default)
