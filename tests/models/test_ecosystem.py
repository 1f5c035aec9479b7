"""Drop-in wherever torchvision's and timm's DenseNets go, tested against the real tools.

Every memory mode of two small configs (ImageNet stem, CIFAR stem) goes through every graph tool:
TorchScript, torch.jit tracing, torch.fx and torchvision's feature extractor, torch.export (strict
and not, dynamic batch), ONNX with both exporters run in onnxruntime. Every registered
architecture is checked to capture torchvision's own graph. timm and huggingface_hub habits are
checked against timm and the real mixin.
"""

from __future__ import annotations

import json
import warnings

import onnx
import onnxruntime as ort
import pytest
import timm
import torch
import torchvision
from huggingface_hub import ModelCard
from torchvision.models.feature_extraction import create_feature_extractor

import densenet_efficient as de
from densenet_efficient.models.builders import adapt_input_conv
from densenet_efficient.models.config import ARCHITECTURES, ArchConfig, densenet_bc_config
from densenet_efficient.models.weights import pretrained_cfg

from ..support.archs import numerics_config, torchvision_reference

MODES = de.MODES
# ImageNet stem with four blocks (transitions and the engine's stem path) and the CIFAR stem.
SMALL = {
    "imagenet": (ArchConfig(8, (2, 2, 2, 2), 16, num_classes=5), 32),
    "cifar": (densenet_bc_config(16, 6, 5), 16),
}
TOOLS = ["script", "trace", "fx", "feature_extractor", "export", "export_strict", "onnx", "onnx_dynamo"]


def _model(config: ArchConfig, mode: str) -> de.DenseNet:
    torch.manual_seed(0)
    model = de.DenseNet(**config.to_kwargs(), memory_efficient=mode)
    with torch.no_grad():  # non-trivial running statistics, so eval-mode BN is not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _run_onnx(path, x: torch.Tensor):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _capture(tool: str, model: torch.nn.Module, x: torch.Tensor, tmp_path):
    """Capture ``model`` with ``tool``; return a callable running the captured artefact."""
    batch = torch.export.Dim("batch", min=1, max=16)
    if tool == "script":
        return torch.jit.script(model)
    if tool == "trace":
        return torch.jit.trace(model, (x,))
    if tool == "fx":
        return torch.fx.symbolic_trace(model)
    if tool == "feature_extractor":
        extractor = create_feature_extractor(model, {"classifier": "logits"})
        return lambda t: extractor(t)["logits"]
    if tool in ("export", "export_strict"):
        program = torch.export.export(
            model, (x,), strict=tool == "export_strict", dynamic_shapes={"x": {0: batch}}
        )
        return program.module()
    path = tmp_path / f"{tool}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if tool == "onnx":
            torch.onnx.export(
                model, (x,), str(path), dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "n"}}
            )
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes={"x": {0: batch}})
    onnx.checker.check_model(str(path))
    return lambda t: _run_onnx(path, t)


#: Graph capture records the naive graph in every mode (``densenet.capturing_graph``), so the tool
#: matrix runs torchvision's mode and one engine mode; the next test shows "max_saving" captures
#: that same graph and computes the same eval outputs, so every tool equals eager in every mode.
CAPTURE_MODES = ("naive", "efficient")


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("mode", CAPTURE_MODES)
@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_tool_equals_eager_in_every_mode(name, mode, tool, tmp_path):
    config, size = SMALL[name]
    model = _model(config, mode)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        run = _capture(tool, model, x, tmp_path)
        assert (run(x) - expected).abs().max() <= 1e-5
        if tool not in ("trace", "fx", "feature_extractor", "script"):  # dynamic batch where declared
            other = torch.randn(3, 3, size, size)
            assert (run(other) - model(other)).abs().max() <= 1e-5
    assert model.memory_efficient == mode  # capture changes nothing on the model


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_mode_captures_one_graph_with_the_same_eval_outputs(name):
    config, size = SMALL[name]
    x = torch.randn(2, 3, size, size)
    graphs, outputs = {}, {}
    for mode in MODES:
        model = _model(config, mode)
        graphs[mode] = torch.fx.symbolic_trace(model).code
        with torch.no_grad():
            outputs[mode] = model(x)
        assert model.memory_efficient == mode
    assert set(MODES) > set(CAPTURE_MODES) and len(set(graphs.values())) == 1
    for mode in MODES:
        assert (outputs[mode] - outputs["efficient"]).abs().max() <= 1e-6, mode


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_captures_torchvisions_graph(arch):
    """In an engine mode the traced graph is torchvision's, node for node, and torchvision's node
    names select the same features."""
    config = numerics_config(arch)
    ours = de.DenseNet(**config.to_kwargs(), memory_efficient="efficient").eval()
    reference = torchvision_reference(config).eval()
    reference.load_state_dict(ours.state_dict())
    ops = [n.op + ":" + str(n.target) for n in torch.fx.symbolic_trace(ours).graph.nodes]
    tv_ops = [n.op + ":" + str(n.target) for n in torch.fx.symbolic_trace(reference).graph.nodes]
    # torchvision concatenates inside each layer, this package once per layer in the block: the same
    # ops in the same number, with the concatenation's own node name aside
    assert sorted(op.replace("torch.cat", "cat") for op in ops) == sorted(
        op.replace("torch.cat", "cat") for op in tv_ops
    )
    size = 8 if config.small_inputs else 32
    x = torch.randn(1, 3, size, size)
    nodes = ["features.denseblock2", "features.norm5"] + (
        [] if config.small_inputs else ["features.transition3"]
    )
    with torch.no_grad():
        got = create_feature_extractor(ours, nodes)(x)
        want = create_feature_extractor(reference, nodes)(x)
    for node in nodes:
        assert torch.allclose(got[node], want[node], atol=1e-5), node


def test_onnx_graph_is_as_lean_as_torchvisions(tmp_path):
    """densenet121 in an engine mode exports the same ONNX operators as torchvision's."""
    ours = de.densenet121(memory_efficient="max_saving").eval()
    reference = torchvision.models.densenet121().eval()
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3, 64, 64)
    counts = []
    for model, name in ((ours, "ours"), (reference, "tv")):
        torch.onnx.export(model, (x,), str(tmp_path / f"{name}.onnx"), dynamo=False)
        graph = onnx.load(str(tmp_path / f"{name}.onnx")).graph
        counts.append(sorted(node.op_type for node in graph.node))
    assert counts[0] == counts[1]
    assert "ScatterND" not in counts[0]
    assert (_run_onnx(tmp_path / "ours.onnx", x) - _run_onnx(tmp_path / "tv.onnx", x)).abs().max() <= 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_training_graph_export_computes_the_naive_step(mode):
    """A training-mode graph captured from an engine mode is the naive graph: the same outputs."""
    config, size = SMALL["imagenet"]
    model = _model(config, mode).train()
    x = torch.randn(4, 3, size, size)
    program = torch.export.export(model, (x,))
    twin = _model(config, "naive").train()
    assert torch.allclose(program.module()(x), twin(x), atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_torch_compile_inference_and_training_equal_eager(mode):
    torch._dynamo.reset()
    config, size = SMALL["imagenet"]
    eager, compiled_model = _model(config, mode).train(), _model(config, mode).train()
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, size, size)
    ya, yb = eager(x), compiled(x)
    assert torch.allclose(ya, yb, atol=1e-5)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for pa, pb in zip(eager.parameters(), compiled_model.parameters(), strict=True):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-4, rtol=1e-4)
    compiled_model.eval()
    with torch.no_grad():
        assert torch.allclose(eager.eval()(x), compiled(x), atol=1e-5)


# -- timm -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair():
    """densenet121 from this package and timm, holding the same random weights."""
    torch.manual_seed(0)
    ours = de.densenet121().eval()
    theirs = timm.create_model("densenet121", pretrained=False).eval()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def test_forward_features_head_and_pre_logits_equal_timms(pair):
    ours, theirs = pair
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = ours.forward_features(x)
        assert torch.equal(feats, theirs.forward_features(x))  # after the final ReLU
        assert torch.equal(
            ours.forward_head(feats, pre_logits=True), theirs.forward_head(feats, pre_logits=True)
        )
        assert torch.allclose(ours(x), theirs(x), atol=1e-6)
        assert torch.relu(ours.features(x)).equal(feats)  # torchvision's features(x) is pre-ReLU


def test_feature_info_intermediates_and_features_only_equal_timms(pair):
    ours, theirs = pair
    assert ours.feature_info == [dict(f) for f in theirs.feature_info]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, inter = ours.forward_intermediates(x)
        t_final, t_inter = theirs.forward_intermediates(x)
        assert torch.equal(final, t_final) and all(
            torch.equal(a, b) for a, b in zip(inter, t_inter, strict=True)
        )
        assert len(ours.forward_intermediates(x, indices=2, intermediates_only=True)) == 2
        ours_f = de.create_model("densenet121", features_only=True, out_indices=(1, 3)).eval()
        theirs_f = timm.create_model("densenet121", features_only=True, out_indices=(1, 3))
        missing, unexpected = ours_f.load_state_dict(ours.state_dict(), strict=False)
        assert not missing and unexpected == ["classifier.weight", "classifier.bias"]
        assert ours_f.feature_info.get_dicts() == theirs_f.feature_info.get_dicts()
        for a, b in zip(ours_f(x), [t_inter[1], t_inter[3]], strict=True):
            assert torch.equal(a, b)


def test_num_classes_zero_in_chans_and_grad_checkpointing_as_timm(pair):
    ours, theirs = pair
    headless = de.densenet121(num_classes=0).eval()
    headless.load_state_dict(ours.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(headless(x), ours.forward_head(ours.forward_features(x), pre_logits=True))
    w = ours.features.conv0.weight.detach()
    for chans in (1, 2, 4, 7):
        assert torch.allclose(adapt_input_conv(w, chans), timm.models.adapt_input_conv(chans, w))
    gray = de.densenet121(in_chans=1).eval()
    assert gray(torch.randn(1, 1, 32, 32)).shape == (1, 1000)
    with pytest.raises(ValueError, match="expects 1 input channels"):
        gray(torch.randn(1, 3, 32, 32))
    model = de.densenet_bc(10)
    model.set_grad_checkpointing(True)
    assert model.memory_efficient == "efficient"
    model.set_memory_efficient("max_saving").set_grad_checkpointing()
    assert model.memory_efficient == "max_saving"
    model.set_grad_checkpointing(False)
    assert model.memory_efficient == "naive"


def test_our_folders_load_in_timm_and_timm_folders_convert_keeping_pretrained_cfg(pair, tmp_path):
    ours, _ = pair
    ours.pretrained_cfg = {**ours.pretrained_cfg, **pretrained_cfg(de.get_weights("densenet121"))}
    ours.save_pretrained(tmp_path / "ours")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'ours'}", pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), ours(x), atol=1e-6)
    assert loaded.pretrained_cfg["crop_pct"] == 0.875 and loaded.pretrained_cfg["license"] == "bsd-3-clause"
    # timm's own export: de.from_pretrained reads it, and convert keeps its pretrained_cfg
    timm_model = timm.create_model("densenet121", pretrained=False, num_classes=3).eval()
    timm.models.save_for_hf(timm_model, str(tmp_path / "timm"))
    ours_again = de.from_pretrained(tmp_path / "timm")
    with torch.no_grad():
        assert torch.allclose(ours_again(x), timm_model(x), atol=1e-6)
    de.convert(tmp_path / "timm", tmp_path / "converted", progress=False)
    saved = json.loads((tmp_path / "converted" / "config.json").read_text())["pretrained_cfg"]
    for key in ("interpolation", "crop_pct", "mean", "std"):
        assert saved[key] == pytest.approx(json.loads(json.dumps(timm_model.pretrained_cfg[key])))


# -- torchvision -------------------------------------------------------------------------------------


def test_torchvision_get_model_weights_get_model_and_list_models():
    enum = torchvision.models.get_model_weights(de.densenet121)
    assert enum is de.DenseNet121_Weights
    assert issubclass(enum, torchvision.models.WeightsEnum)
    tv = torchvision.models.DenseNet121_Weights.DEFAULT.transforms()
    image = torch.randint(0, 256, (3, 300, 280), dtype=torch.uint8)
    assert torch.equal(enum.DEFAULT.transforms()(image), tv(image))
    assert de.list_models() == sorted(ARCHITECTURES)
    assert de.list_models(include="densenet1*", exclude="*69") == ["densenet121", "densenet161"]
    assert de.get_model("densenet_bc_100", memory_efficient=True).memory_efficient == "efficient"
    with pytest.raises(ValueError, match="unknown architecture 'resnet50'"):
        de.get_model("resnet50")


# -- huggingface_hub ---------------------------------------------------------------------------------


def test_from_pretrained_takes_the_mixins_arguments(tmp_path):
    model = de.densenet_bc(10)
    model.save_pretrained(tmp_path / "m")
    loaded = de.DenseNet.from_pretrained(
        tmp_path / "m",
        strict=True,
        proxies=None,
        resume_download=None,
        force_download=False,
        map_location="cpu",
    )
    assert torch.equal(loaded.features.conv0.weight, model.features.conv0.weight)
    with pytest.raises(ValueError, match="cannot change the saved architecture \\(growth_rate=7\\)"):
        de.DenseNet.from_pretrained(tmp_path / "m", growth_rate=7)


def test_save_pretrained_replaces_our_files_and_keeps_everyone_elses(tmp_path):
    out = tmp_path / "m"
    de.densenet_bc(10, num_classes=3).save_pretrained(out)
    (out / "notes.txt").write_text("mine")
    (out / "README.md").write_text("my own card")
    de.densenet_bc(10, num_classes=4).save_pretrained(out)  # every epoch into the same folder
    assert json.loads((out / "config.json").read_text())["num_classes"] == 4
    assert de.from_pretrained(out).num_classes == 4
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "README.md").read_text() == "my own card"  # a card this package did not write stays
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "notes.txt",
    ]


def test_card_licence_and_tags_follow_the_weights(tmp_path):
    model = de.densenet_bc(10)
    model.save_pretrained(tmp_path / "own")
    assert ModelCard.load(tmp_path / "own" / "README.md").data.license == "mit"
    tv = de.densenet121()
    tv.pretrained_cfg.update(pretrained_cfg(de.get_weights("densenet121")))
    tv.save_pretrained(tmp_path / "tv")
    card = ModelCard.load(tmp_path / "tv" / "README.md").data
    assert card.license == "bsd-3-clause" and "torchvision" in card.tags


def test_push_to_hub_checks_its_arguments_before_creating_a_repo(monkeypatch):
    from huggingface_hub import HfApi

    created = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: created.append(a or k))
    model = de.densenet_bc(10)
    with pytest.raises(ValueError, match="take no config"):
        model.push_to_hub("me/model", config={"lr": 0.1})
    with pytest.raises(ValueError, match="unknown model_card_kwargs colour"):
        model.push_to_hub("me/model", model_card_kwargs={"colour": "red"})
    with pytest.raises(ValueError, match="invalid repo id"):
        model.push_to_hub("not a repo id!")
    assert created == []


def test_config_and_weights_that_disagree_are_an_error_naming_both(tmp_path):
    de.densenet_bc(10).save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["num_classes"] = 5
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        de.StateDictMismatchError, match="says num_classes=5 but model.safetensors holds a classifier with 10"
    ):
        de.from_pretrained(tmp_path / "m")
    config["num_classes"] = 10
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="re-initialised classifier.weight"):  # only when asked for
        assert de.from_pretrained(tmp_path / "m", num_classes=5).num_classes == 5


def test_headless_model_round_trips(tmp_path):
    model = de.densenet_bc(10)
    model.reset_classifier(0)
    model.save_pretrained(tmp_path / "m")
    loaded = de.from_pretrained(tmp_path / "m")
    assert loaded.num_classes == 0 and isinstance(loaded.classifier, torch.nn.Identity)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded(x), model.eval()(x))
