"""torch.compile sees the engine: one graph (fullgraph=True) in every mode, equal to eager.

The blocks, transitions, stem and norm5 run as custom ops under the compiler (models/engine/ops.py). These
tests compile with the ``aot_eager`` backend (dynamo + AOTAutograd + functionalization, where the
ops' schemas, fake kernels and autograd formulas matter) and once with inductor.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import densenet_efficient as de
from densenet_efficient.models.engine import native, ops
from densenet_efficient.models.memory_plan import MemoryPlan

from .test_engine import TINY, TINY_IMAGENET, _assert_same_state, _randomise_bn, _rel

#: (model kwargs, image size, memory_efficient setting): every mode, dial plans with naive blocks
#: after engine blocks, per-layer flags, the ImageNet stem and dropout (momentum=None, bf16 and
#: channels_last below; the per-block plan runs the ImageNet stem in max_saving).
SETTINGS = {
    "efficient": (TINY, 8, "efficient"),
    "max_saving": (TINY, 8, "max_saving"),
    "imagenet-efficient": (TINY_IMAGENET, 33, "efficient"),
    "per-block": (TINY_IMAGENET, 32, MemoryPlan(("max_saving", "efficient", "naive", "efficient"), "max_saving")),
    "per-layer, dropout": ({**TINY, "drop_rate": 0.3}, 8, [(True, False), "max_saving"]),
}


def _twin_models(kwargs, setting, dtype=torch.float64):
    eager = de.DenseNet(**kwargs).to(dtype)
    _randomise_bn(eager)
    eager.set_memory_efficient(setting)
    return eager, copy.deepcopy(eager)


def _step(model, x, y, seed):
    torch.manual_seed(seed)  # dropout draws the same masks in both
    out = model(x)
    F.cross_entropy(out, y).backward()
    return out


@pytest.mark.parametrize("name", SETTINGS)
def test_fullgraph_training_and_inference_equal_eager_float64(name):
    kwargs, size, setting = SETTINGS[name]
    torch._dynamo.reset()
    eager, twin = _twin_models(kwargs, setting)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    for seed in range(2):  # the second step reads the first one's running statistics (eval below)
        x = torch.randn(3, 3, size, size, dtype=torch.float64)
        y = torch.randint(0, kwargs["num_classes"], (3,))
        ya, yb = _step(eager, x, y, seed), _step(compiled, x, y, seed)
        assert _rel(yb, ya) < 1e-12
    _assert_same_state(eager, twin)
    eager.eval(), twin.eval()
    with torch.no_grad():
        assert _rel(compiled(x), eager(x)) < 1e-12


def test_momentum_none_cumulative_average_compiled():
    torch._dynamo.reset()
    eager, twin = _twin_models(TINY_IMAGENET, "efficient")
    for model in (eager, twin):
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    for seed in range(3):
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        y = torch.randint(0, 5, (2,))
        _step(eager, x, y, seed), _step(compiled, x, y, seed)
    _assert_same_state(eager, twin)


def test_bf16_autocast_and_channels_last_compiled_equal_eager():
    torch._dynamo.reset()
    eager, twin = _twin_models(TINY_IMAGENET, "efficient", dtype=torch.float32)
    eager, twin = eager.to(memory_format=torch.channels_last), twin.to(memory_format=torch.channels_last)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (2,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb = _step(eager, x, y, 0), _step(compiled, x, y, 0)
    assert ya.dtype == yb.dtype == torch.bfloat16
    # the same kernels in the same order (the ops run the eager code): equal, up to bf16 noise
    assert _rel(yb, ya) < 1e-2
    for pa, pb in zip(eager.parameters(), twin.parameters(), strict=True):
        assert _rel(pb.grad, pa.grad) < 2e-2


def test_no_graph_breaks_in_any_engine_mode():
    model = de.DenseNet(**TINY_IMAGENET, memory_efficient="efficient")
    x = torch.randn(2, 3, 32, 32)
    for setting in ("efficient", "max_saving", ["max_saving", "efficient", "naive", "efficient"]):
        model.set_memory_efficient(setting)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1


def test_inductor_fullgraph_training_step_equals_eager():
    """One real inductor compile (the CPU backend users get by default)."""
    torch._dynamo.reset()
    eager, twin = _twin_models(TINY, "max_saving")
    compiled = torch.compile(twin, fullgraph=True)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (2,))
    ya, yb = _step(eager, x, y, 0), _step(compiled, x, y, 0)
    assert _rel(yb, ya) < 1e-12
    _assert_same_state(eager, twin)


def _block_args(keep, training=True):
    native.ensure()  # the ops' kernels are registered when the engine is chosen
    model = de.DenseNet(**{**TINY_IMAGENET, "drop_rate": 0.2}).double().train(training)
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64, requires_grad=True)
    return ops.block_op_args(list(model.features.denseblock1.values()), x, keep, training)


@pytest.mark.parametrize(
    "keep,training", [((True, True), True), ((False, True), True), ((True, False), False)], ids=str
)
def test_block_op_passes_opcheck(keep, training):
    """Schema, fake kernel (static and dynamic shapes), autograd registration, AOT dispatch."""
    torch.library.opcheck(torch.ops.densenet_efficient.dense_block.default, _block_args(keep, training))


def tail_case(model: de.DenseNet, kind: str) -> tuple[torch.Tensor, torch.nn.Module, torch.nn.Module | None]:
    """An input, the BN and what follows it for the tail op of ``kind`` in ``model``."""
    native.ensure()  # the ops' kernels are registered when the engine is chosen
    f = model.features
    norm, module = {
        "transition": (f.transition1.norm, f.transition1.conv),
        "stem": (f.norm0, f.pool0),
        "identity": (f.norm5, None),
    }[kind]
    return torch.randn(2, norm.num_features, 8, 8, dtype=norm.weight.dtype, requires_grad=True), norm, module


@pytest.mark.parametrize(
    "kind,mode", [("transition", "efficient"), ("stem", "efficient"), ("stem", "max_saving"), ("identity", "efficient")]
)
def test_tail_op_passes_opcheck(kind, mode):
    x, norm, module = tail_case(de.DenseNet(**TINY_IMAGENET).double(), kind)
    torch.library.opcheck(
        torch.ops.densenet_efficient.norm_relu_tail.default, ops.tail_op_args(x, norm, module, kind, mode)
    )


def test_ops_never_mutate_the_running_statistics():
    """The op is functional (its schema says so, autograd requires it): the caller updates."""
    args = _block_args((True, True))
    running = [t.clone() for t in args[2]]
    torch.ops.densenet_efficient.dense_block(*args)
    assert all(torch.equal(a, b) for a, b in zip(running, args[2], strict=True))


def test_unsupported_convolution_is_refused_clearly_when_compiling():
    torch._dynamo.reset()
    model = de.DenseNet(**TINY, memory_efficient="efficient")
    layer = model.features.denseblock1.denselayer1
    layer.conv2 = torch.nn.Conv2d(layer.conv2.in_channels, layer.conv2.out_channels, 3, padding=2, dilation=2, bias=False)
    with pytest.raises(Exception, match="compiled engine runs torchvision's dense layers' 3x3"):
        torch.compile(model, fullgraph=True, backend="aot_eager")(torch.randn(2, 3, 8, 8))


def test_train_compile_captures_cuda_graphs_on_cuda_only():
    from densenet_efficient.training.loop import compile_mode

    assert compile_mode(torch.device("cuda", 0)) == "reduce-overhead"
    assert compile_mode(torch.device("cpu")) is None


def test_changing_batch_size_recompiles_dynamic_and_stays_equal():
    """An epoch's smaller last batch makes dynamo recompile with a symbolic batch: the ops' fake
    kernels must run on symbolic shapes (opcheck's dynamic test covers the ops alone)."""
    torch._dynamo.reset()
    eager, twin = _twin_models(TINY_IMAGENET, "max_saving")
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    for seed, batch in enumerate((4, 3, 5)):
        x = torch.randn(batch, 3, 32, 32, dtype=torch.float64)
        y = torch.randint(0, 5, (batch,))
        _step(eager, x, y, seed), _step(compiled, x, y, seed)
    _assert_same_state(eager, twin)


def test_eval_mode_fine_tuning_gradients_compiled():
    """model.eval() with gradients (frozen BN statistics): backward normalises with the running ones."""
    torch._dynamo.reset()
    eager, twin = _twin_models(TINY_IMAGENET, "efficient")
    for b in eager.buffers():
        if b.is_floating_point():
            b.uniform_(0.5, 1.5)
    twin.load_state_dict(eager.state_dict())
    eager.eval(), twin.eval()
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y = torch.randint(0, 5, (3,))
    _step(eager, x, y, 0), _step(compiled, x2, y, 0)
    assert _rel(x2.grad, x.grad) < 1e-12
    _assert_same_state(eager, twin)
