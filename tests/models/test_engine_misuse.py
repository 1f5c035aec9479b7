"""The engine under misuse: in-place changes between forward and backward, low-precision
parameters, empty batches. It must do what the naive path does, never give other numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import densenet_efficient as de

from .test_engine import TINY_IMAGENET, _rel, _twins

ALL_MODES = ["naive", "efficient", "max_saving"]
# The three kinds of engine Function in one tiny ImageNet-stem model (stem, dense block, transition).
PARTS = ["norm0", "denseblock1", "transition1"]


def _part(model: de.DenseNet, name: str) -> nn.Module:
    return getattr(model.features, name)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("mode", ALL_MODES)
def test_parameter_changed_in_place_before_backward_raises(mode, part, training):
    """Backward would otherwise use the new values: autograd's version check must fire, as in naive."""
    _, model = _twins(mode, **TINY_IMAGENET)
    model.train(training)
    x = torch.randn(2, 3, 33, 33, dtype=torch.float64, requires_grad=True)
    y = model(x).pow(2).sum()
    with torch.no_grad():
        for p in _part(model, part).parameters():
            p.mul_(1.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("mode", ALL_MODES)
def test_one_parameter_changed_in_place_is_caught(mode):
    """Every saved parameter is checked, not only the first: change only the last layer's conv."""
    _, model = _twins(mode, **TINY_IMAGENET)
    y = model(torch.randn(2, 3, 33, 33, dtype=torch.float64)).sum()
    with torch.no_grad():
        model.features.denseblock1.denselayer2.conv2.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("mode", ["efficient", "max_saving"])
def test_transition_input_changed_in_place_raises(mode):
    _, model = _twins(mode, **TINY_IMAGENET)
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64, requires_grad=True)
    h = x * 1.0
    y = model.features.transition1(h).sum()
    with torch.no_grad():
        h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("mode", ["efficient", "max_saving"])
def test_replaced_parameter_does_not_leak_into_backward(mode):
    """A parameter swapped on the module after forward: backward uses the forward's tensors, as naive."""
    naive, eff = _twins(mode, **TINY_IMAGENET)
    x = torch.randn(2, 3, 33, 33, dtype=torch.float64)
    grads = []
    for model in (naive, eff):
        old = [model.features.denseblock1.denselayer1.conv1, model.features.transition1.conv]
        kept = [m.weight for m in old]
        y = model(x).pow(2).sum()
        for m in old:
            m.weight = nn.Parameter(m.weight.detach() * 3)
        y.backward()
        grads.append([w.grad for w in kept])
    for ga, gb in zip(*grads, strict=True):
        assert _rel(gb, ga) < 1e-9


@pytest.mark.parametrize("mode", ["efficient", "max_saving"])
def test_eval_running_stats_changed_after_forward_raises(mode):
    """In eval mode backward needs the statistics forward normalised with. The engine saves the
    running buffers themselves (no copies, as naive): a later in-place change of any of them
    raises autograd's error, as naive does, instead of silently giving other gradients."""
    for part in ("norm0", "denseblock1", "transition1"):
        _, model = _twins(mode, **TINY_IMAGENET)
        model.eval()
        x = torch.randn(2, 3, 33, 33, dtype=torch.float64, requires_grad=True)
        y = model(x).pow(2).sum()
        bn = next(m for m in getattr(model.features, part).modules() if isinstance(m, nn.BatchNorm2d))
        with torch.no_grad():
            bn.running_var.mul_(4.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()


def _global_rel(model: nn.Module, ref: nn.Module) -> float:
    flat = torch.cat([p.grad.double().flatten() for p in model.parameters()])
    return _rel(flat, torch.cat([p.grad.flatten() for p in ref.parameters()]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["bc10", "tiny_imagenet"])
def test_low_precision_parameters_train_like_naive(dtype, arch):
    """A model converted with .half()/.bfloat16() trains in every mode, with gradients in the
    parameters' dtype and as close to float64 as naive's in that dtype."""
    kwargs, size = (de.densenet_bc_config(10).to_kwargs(), 16) if arch == "bc10" else (TINY_IMAGENET, 33)
    ref = de.DenseNet(**kwargs).double()
    x = torch.randn(4, 3, size, size, dtype=torch.float64)
    ref(x).pow(2).sum().backward()
    errors = {}
    for mode in ALL_MODES:
        model = de.DenseNet(**kwargs, memory_efficient=mode)
        model.load_state_dict(ref.state_dict())
        model.to(dtype)
        model(x.to(dtype)).float().pow(2).sum().backward()
        assert all(p.grad.dtype == dtype and torch.isfinite(p.grad).all() for p in model.parameters())
        errors[mode] = _global_rel(model, ref)
    for mode in ("efficient", "max_saving"):
        assert errors[mode] < 2 * errors["naive"] + 0.02, errors


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("mode", ["efficient", "max_saving"])
def test_empty_batch_matches_naive(mode, training):
    naive, eff = _twins(mode, **TINY_IMAGENET)
    for model in (naive, eff):
        model.train(training)
    outs = []
    for model in (naive, eff):
        x = torch.randn(0, 3, 33, 33, dtype=torch.float64, requires_grad=True)
        y = model(x)
        (y.sum() + sum(p.sum() for p in model.parameters())).backward()  # every grad defined
        outs.append((y, x.grad))
    (ya, ga), (yb, gb) = outs
    assert yb.shape == ya.shape == (0, TINY_IMAGENET["num_classes"]) and gb.shape == ga.shape
    for (name, pa), pb in zip(naive.named_parameters(), eff.parameters(), strict=True):
        assert torch.equal(pa.grad, pb.grad), name
    for (name, ba), bb in zip(naive.named_buffers(), eff.buffers(), strict=True):
        assert torch.equal(ba, bb), name  # num_batches_tracked counted, running stats untouched
