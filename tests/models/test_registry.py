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
    assert de.list_models(exclude=["densenet1*", "*bc*"]) == ["densenet201"]
    assert de.list_models(include=["*bc*", "densenet2*"], exclude="densenet201") == ["densenet_bc_100"]


def test_unknown_names_fail_listing_the_registered_ones():
    for call in (lambda: de.get_model("densenet999"), lambda: de.create_model("densenet999")):
        with pytest.raises(
            ValueError, match=r"unknown architecture 'densenet999'; expected one of densenet121, "
        ):
            call()
    assert not registry.is_model("densenet999") and registry.is_model("densenet121")


def test_a_new_architecture_is_one_table_row_and_one_builder(monkeypatch):
    """densenet264 (not published by torchvision): its row, its decorated builder, nothing else."""
    monkeypatch.setitem(config.ARCHITECTURES, "densenet264", ArchConfig(32, (6, 12, 64, 48), 64))
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))

    @registry.register_model
    def densenet264(*, weights=None, progress=True, pretrained=False, **kwargs):
        """DenseNet-264 (k=32, blocks 6-12-64-48)."""
        return builders._named("densenet264", weights, progress, pretrained, **kwargs)

    assert "densenet264" in de.list_models("densenet2*")
    model = de.get_model("densenet264", num_classes=10, memory_efficient=True)
    assert model.arch_config.architecture_name(
        ignore_classes=True
    ) == "densenet264" and model.arch_config.block_config == (6, 12, 64, 48)
    assert de.create_model("densenet264", num_classes=10).num_classes == 10
    with pytest.raises(
        de.WeightsNotAvailableError, match="no pretrained weights are published for densenet264"
    ):
        de.create_model("densenet264", pretrained=True)
    shapes = model.arch_config.state_dict_shapes()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_registering_needs_a_table_row_and_a_new_name(monkeypatch):
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))

    def densenet999():
        """A builder without a row."""

    with pytest.raises(RuntimeError, match="no architecture 'densenet999' in models/config.py ARCHITECTURES"):
        registry.register_model(densenet999)

    def densenet121():
        """A second builder for a registered name."""

    with pytest.raises(RuntimeError, match="'densenet121' is registered twice"):
        registry.register_model(densenet121)
