"""Architecture knowledge in one place: names, sizes and the JSON form of every config."""

from __future__ import annotations

import pytest
import torch

import densenet_efficient as de
from densenet_efficient.models.config import ARCHITECTURES, ArchConfig, densenet_bc_config, resolve_arch

# One small config per stem kind, plus every registered architecture.
SMALL_IMAGENET = ArchConfig(growth_rate=4, block_config=(1, 1, 1), num_init_features=8, num_classes=3)
CONFIGS = [*ARCHITECTURES.values(), SMALL_IMAGENET, densenet_bc_config(40, 24), densenet_bc_config(16)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_json_round_trip(config):
    data = config.to_json()
    assert isinstance(data["block_config"], list)
    assert ArchConfig.from_json(data) == config
    assert ArchConfig.from_json({**data, "unrelated": 1}) == config  # config.json carries more keys


def test_from_json_names_what_is_missing():
    with pytest.raises(
        ValueError, match="cfg.json: missing architecture fields growth_rate, num_init_features"
    ):
        ArchConfig.from_json({"block_config": [1, 2]}, source="cfg.json")
    with pytest.raises(ValueError, match="block_config must be a list of ints, found 6"):
        ArchConfig.from_json({"growth_rate": 1, "block_config": 6, "num_init_features": 2})


def test_names():
    assert [c.name for c in ARCHITECTURES.values()] == list(ARCHITECTURES)
    assert densenet_bc_config(250).name == "densenet_bc_250"
    assert densenet_bc_config(40, 24).name == "densenet_bc_40_k24"
    assert resolve_arch("densenet_bc_250") == densenet_bc_config(250)
    assert SMALL_IMAGENET.name == SMALL_IMAGENET.describe()
    assert SMALL_IMAGENET.name.startswith("DenseNet(k=4, blocks=(1, 1, 1)")
    assert ARCHITECTURES["densenet121"].with_classes(5).architecture_name() is None
    assert (
        ARCHITECTURES["densenet121"].with_classes(5).architecture_name(ignore_classes=True) == "densenet121"
    )


@pytest.mark.parametrize("config", [SMALL_IMAGENET, densenet_bc_config(16)], ids=lambda c: c.name)
def test_min_input_size_is_the_smallest_size_the_model_accepts(config):
    least = config.min_input_size()
    model = de.DenseNet(**config.to_kwargs()).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, least, least)).shape == (1, config.num_classes)
    with pytest.raises(ValueError, match=f"at least {least}"):
        model(torch.randn(1, 3, least - 1, least - 1))
    assert config.last_block_size(least) == 1


def test_default_and_minimum_sizes_of_the_named_architectures():
    assert {n: (c.default_resolution, c.min_input_size()) for n, c in ARCHITECTURES.items()} == {
        "densenet121": (224, 29),
        "densenet161": (224, 29),
        "densenet169": (224, 29),
        "densenet201": (224, 29),
        "densenet264": (224, 29),
        "densenet_bc_100": (32, 4),
    }


ODD = ArchConfig(growth_rate=5, block_config=(3, 1, 2), num_init_features=7, bn_size=3, num_classes=4)


@pytest.mark.parametrize("config", [*CONFIGS, ODD], ids=lambda c: c.name)
def test_state_dict_shapes_are_the_models(config):
    """The arithmetic shapes are the built model's state dict: same keys, order and shapes."""
    with torch.device("meta"):
        model = de.DenseNet(**config.to_kwargs())
    expected = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert list(config.state_dict_shapes().items()) == expected


def test_state_dict_shapes_of_a_huge_config_cost_nothing():
    """What a hostile config.json asks for is computed, not allocated (a model would need terabytes)."""
    import time

    start = time.perf_counter()
    shapes = ArchConfig(
        growth_rate=100000, block_config=(3000, 1, 1), num_init_features=24
    ).state_dict_shapes()
    assert time.perf_counter() - start < 1.0
    assert shapes["features.denseblock1.denselayer3000.conv2.weight"] == (100000, 400000, 3, 3)
