"""The torchvision compatibility contract: layout, init, numerics, loading and input validation."""

from __future__ import annotations

import json

import pytest
import torch

import densenet_efficient as de
from densenet_efficient.models.config import get_config

from ..support.archs import ALL_ARCHS, IMAGENET_ARCHS, input_size, numerics_config, torchvision_reference

TV_PARAMS = {
    "densenet121": 7_978_856,
    "densenet161": 28_681_000,
    "densenet169": 14_149_480,
    "densenet201": 20_013_928,
    "densenet264": 33_337_704,  # torchvision.models.DenseNet(32, (6, 12, 64, 48), 64) counts the same
    "densenet_bc_100": 769_162,
}


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_layout_equals_torchvision(arch):
    with torch.device("meta"):  # names, shapes and dtypes only: no memory, no initialisation
        ours = de.create_model(arch)
        ref = torchvision_reference(get_config(arch))
    sa, sb = ours.state_dict(), ref.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype, k
    assert {k: tuple(v.shape) for k, v in sa.items()} == get_config(arch).state_dict_shapes()
    assert sum(p.numel() for p in ours.parameters()) == TV_PARAMS[arch]
    # strict load both ways
    ours.load_state_dict(ref.state_dict())
    ref.load_state_dict(ours.state_dict())


@pytest.mark.parametrize("arch", IMAGENET_ARCHS)
def test_same_seed_same_parameters(arch):
    import torchvision

    torch.manual_seed(123)
    ours = de.create_model(arch)
    torch.manual_seed(123)
    ref = getattr(torchvision.models, arch)()
    for (ka, a), (kb, b) in zip(ours.state_dict().items(), ref.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(a, b), ka


def _pair(arch, dtype=torch.float32):
    cfg = numerics_config(arch)
    ref = torchvision_reference(cfg).to(dtype)
    ours = de.DenseNet(**cfg.to_kwargs()).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ours, ref, cfg


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_eval_outputs_equal_torchvision(arch):
    ours, ref, cfg = _pair(arch)
    # non-trivial running statistics so eval-mode BN is exercised
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    ours.load_state_dict(ref.state_dict())
    ours.eval(), ref.eval()
    x = torch.randn(2, 3, input_size(cfg), input_size(cfg))
    with torch.no_grad():
        assert _rel(ours(x), ref(x)) < 1e-5


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_train_step_float64_equals_torchvision(arch):
    ours, ref, cfg = _pair(arch, torch.float64)
    ours.train(), ref.train()
    x = torch.randn(2, 3, input_size(cfg), input_size(cfg), dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    assert _rel(ya, yb) < 1e-9
    g = torch.randn_like(ya)
    ya.backward(g), yb.backward(g)
    assert _rel(xa.grad, xb.grad) < 1e-9
    pa, pb = dict(ours.named_parameters()), dict(ref.named_parameters())
    for k in pa:
        assert _rel(pa[k].grad, pb[k].grad) < 1e-9, k
    ba, bb = dict(ours.named_buffers()), dict(ref.named_buffers())
    for k in ba:
        assert torch.allclose(ba[k], bb[k], rtol=1e-12, atol=1e-12), k


def test_densenet_bc_100_runs_forward_backward():
    model = de.densenet_bc_100()
    assert sum(p.numel() for p in model.parameters()) == 769_162
    assert model.features.norm5.num_features == 342
    y = model(torch.randn(4, 3, 32, 32))
    assert y.shape == (4, 10)
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert not hasattr(model.features, "norm0") and model.features.conv0.kernel_size == (3, 3)


@pytest.mark.parametrize("depth,blocks", [(40, (6, 6, 6)), (100, (16, 16, 16)), (250, (41, 41, 41))])
def test_densenet_bc_depths(depth, blocks):
    model = de.densenet_bc(depth)
    assert model.arch_config.block_config == blocks
    assert model.arch_config.num_init_features == 24


@pytest.mark.parametrize("depth", [41, 4, 99])
def test_densenet_bc_bad_depth(depth):
    with pytest.raises(ValueError, match=r"6n\+4.*got " + str(depth)):
        de.densenet_bc(depth)


def test_old_style_keys_and_prefix_load():
    ref = torchvision_reference(get_config("densenet_bc_100"))
    old = {}
    for k, v in ref.state_dict().items():
        k = k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2.").replace(".norm2.", ".norm.2.")
        k = k.replace(".conv1.", ".conv.1.")
        if not k.endswith("num_batches_tracked"):  # 2017 files have no counters at all
            old["module." + k] = v
    assert any(".norm.1." in k for k in old)
    model = de.densenet_bc_100()
    model.load_state_dict(old)
    for k, v in model.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, ref.state_dict()[k]), k


def test_mismatched_checkpoint_names_the_keys():
    model = de.densenet_bc_100()
    sd = model.state_dict()
    bad = dict(sd)
    del bad["features.norm5.weight"]
    bad["features.extra.weight"] = torch.zeros(1)
    bad["classifier.weight"] = torch.zeros(3, 342)
    with pytest.raises(de.StateDictMismatchError) as err:
        model.load_state_dict(bad)
    msg = str(err.value)
    assert "missing keys: features.norm5.weight" in msg
    assert "unexpected keys: features.extra.weight" in msg
    assert "classifier.weight (checkpoint (3, 342), model (10, 342))" in msg


@pytest.mark.parametrize(
    "shape,match",
    [
        ((3, 32, 32), r"4-D input.*got shape \(3, 32, 32\)"),
        ((1, 1, 32, 32), r"3 input channels.*got 1"),
        ((1, 3, 16, 16), r"16x16 is too small.*at least 29"),
    ],
)
def test_bad_input_messages(shape, match):
    with torch.device("meta"):  # the input is checked before any computation: no weights needed
        model = de.densenet121().eval()
        with pytest.raises(ValueError, match=match):
            model(torch.randn(*shape))


def test_cifar_min_size():
    model = de.densenet_bc_100().eval()
    with pytest.raises(ValueError, match="at least 4"):
        model(torch.randn(1, 3, 3, 3))


def test_forward_features_and_reset_classifier():
    model = de.densenet_bc_100().eval()
    x = torch.randn(2, 3, 16, 16)
    feats = model.forward_features(x)
    assert feats.shape == (2, 342, 4, 4)
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and model.arch_config.num_classes == 7
    model.reset_classifier(0)
    assert model(x).shape == (2, 342)


@pytest.mark.parametrize("bad", ["fast", 2, "Efficient"])
def test_bad_mode(bad):
    with pytest.raises(ValueError, match="memory_efficient must be"):
        de.densenet_bc_100(memory_efficient=bad)


def test_bad_arch_arguments():
    with pytest.raises(ValueError, match="growth_rate must be an integer >= 1, found 0"):
        de.DenseNet(growth_rate=0)
    with pytest.raises(ValueError, match=r"block_config must be a list of ints, found \(\)"):
        de.DenseNet(block_config=())


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("drop_rate", "0.5", r"drop_rate must be a number in \[0, 1\), found '0.5'"),
        ("drop_rate", True, r"drop_rate must be a number in \[0, 1\), found True"),
        ("drop_rate", float("nan"), r"drop_rate must be a number in \[0, 1\), found nan"),
        ("small_inputs", "yes", "small_inputs must be true or false, found 'yes'"),
        ("block_config", [1, "12"], r"block_config\[1\] must be an integer >= 1, found '12'"),
        ("num_classes", 2.0, "num_classes must be an integer >= 0, found 2.0"),
    ],
)
def test_constructor_arguments_are_checked_as_config_json_is(tmp_path, field, value, message):
    """DenseNet(...) and a config.json refuse the same values with the same sentence (config.json's
    naming the file): one check of both."""
    with pytest.raises(de.errors.UsageError, match=f"^{message}$"):
        de.DenseNet(**{"growth_rate": 4, "block_config": (1, 1), "num_init_features": 8, field: value})
    model = de.DenseNet(growth_rate=4, block_config=(1, 1), num_init_features=8)
    model.save_pretrained(tmp_path / "m")
    data = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**data, field: value}))
    with pytest.raises(de.errors.UsageError, match=f": {message}$"):
        de.from_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="unknown architecture 'densenet999'"):
        de.create_model("densenet999")
