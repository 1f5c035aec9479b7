"""The model registry: one list of names from which builders, get_model, exports and the hub derive."""

from __future__ import annotations

import pytest
import torch

import densenet_efficient as de
from densenet_efficient.models import builders, config, registry
from densenet_efficient.models.config import ArchConfig


def test_every_table_row_has_one_registered_builder_and_back():
    assert de.list_models() == de.list_architectures() == sorted(de.ARCHITECTURES)
    for name in de.list_models():
        builder = registry.get_model_builder(name)
        assert builder.__name__ == name and getattr(de, name) is builder and name in de.__all__
        assert builder.__doc__ and name in builders.__all__


def test_list_models_filters_as_torchvision():
    assert de.list_models(include="densenet1*") == ["densenet121", "densenet161", "densenet169"]
    assert de.list_models(exclude=["densenet1*", "*bc*"]) == ["densenet201", "densenet264"]
    assert de.list_models(include=["*bc*", "densenet2*"], exclude="densenet201") == [
        "densenet264",
        "densenet_bc_100",
    ]


def test_unknown_names_fail_listing_the_registered_ones():
    for call in (lambda: de.get_model("densenet999"), lambda: de.create_model("densenet999")):
        with pytest.raises(
            ValueError, match=r"unknown architecture 'densenet999'; expected one of densenet121, "
        ):
            call()
    assert not registry.is_model("densenet999") and registry.is_model("densenet121")


def test_a_new_model_is_one_table_row_and_one_builder(monkeypatch):
    """A row with published weights and its decorated builder: the architecture, the manifest, the
    weights lookups and the generated files' text follow, with no other edit."""
    import densenet_efficient.models.weights as W

    from ..test_generated import generator

    meta = {**config.MODEL_TABLE["densenet121"].weights["IMAGENET1K_V1"].meta, "acc@1": 1.5}
    weights = config.Weights("https://example.org/densenet88-0123abcd.pth", meta, num_classes=7)
    row = config.ModelEntry("DenseNet-88", ArchConfig(16, (2, 4, 8, 6), 32), {"V1": weights})
    monkeypatch.setitem(config.MODEL_TABLE, "densenet88", row)
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))

    @registry.register_model
    def densenet88(*, weights=None, progress=True, pretrained=False, **kwargs):
        """DenseNet-88 (k=16, blocks 2-4-8-6)."""
        return builders._named("densenet88", weights, progress, pretrained, **kwargs)

    assert "densenet88" in de.list_models("densenet8*") and de.ARCHITECTURES["densenet88"] == row.config
    model = de.get_model("densenet88", num_classes=10, memory_efficient=True)
    assert model.arch_config.architecture_name(ignore_classes=True) == "densenet88"
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == model.arch_config.state_dict_shapes()
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    spec = de.get_weights("densenet88")
    assert (spec.name, spec.num_classes, spec.sha256_prefix) == ("V1", 7, "0123abcd")
    assert spec.meta["num_params"] == sum(
        p.numel() for p in de.create_model("densenet88", num_classes=7).parameters()
    )
    assert W.builtin_manifest()["architectures"]["densenet88"]["default"] == "V1"
    assert (
        de.list_weights("densenet88") == ["densenet88.V1"]
        and W.enum_name("densenet88") == "DenseNet88_Weights"
    )
    assert "def densenet88(pretrained: bool = False" in generator().hub_entrypoints()
    assert "| `densenet88` | DenseNet-88: k=16, blocks 2-4-8-6" in generator().readme_models()


def test_enums_exist_for_exactly_the_rows_with_weights():
    import densenet_efficient.models.weights as W

    published = [arch for arch, row in config.MODEL_TABLE.items() if row.weights]
    assert list(W.ENUM_NAMES) == published and "densenet264" not in published
    for arch in de.list_models():
        enum = W.weights_enum(arch)
        assert (enum is None) == (arch not in published)
        if enum is not None:
            assert [m.name for m in enum] == list(config.MODEL_TABLE[arch].weights)
            assert getattr(de, enum.__name__) is enum and enum.__name__ in de.__all__


def test_registering_needs_a_table_row_and_a_new_name(monkeypatch):
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))

    def densenet999():
        """A builder without a row."""

    with pytest.raises(RuntimeError, match="no architecture 'densenet999' in models/config.py MODEL_TABLE"):
        registry.register_model(densenet999)

    def densenet121():
        """A second builder for a registered name."""

    with pytest.raises(RuntimeError, match="'densenet121' is registered twice"):
        registry.register_model(densenet121)
