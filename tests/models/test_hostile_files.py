"""Hostile input, round two, in files: numbers that would cost time in proportion to themselves,
fields of the wrong type in a config.json, checkpoints wrapped thousands of levels deep.

Every input here is made by the test; none of them is one of the review's examples.
"""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch

import densenet_efficient as de
from densenet_efficient import cli
from densenet_efficient.errors import UsageError
from densenet_efficient.io.checkpoint import CheckpointError, read_checkpoint
from densenet_efficient.io.state_dict import StateDictMismatchError
from densenet_efficient.models.config import ArchConfig, densenet_bc_config, get_config, resolve_arch


def _brute_min_input_size(config: ArchConfig) -> int:
    size = 1
    while config.last_block_size(size) < 1:
        size += 1
    return size


@pytest.mark.parametrize("small_inputs", [True, False])
def test_min_input_size_is_the_smallest_size_that_works_at_any_block_count(small_inputs):
    for blocks in range(1, 11):
        config = ArchConfig(4, (1,) * blocks, 8, small_inputs=small_inputs)
        assert config.min_input_size() == _brute_min_input_size(config), blocks
    for blocks in (40, 300, 5000):  # 2**blocks pixels: no search could reach them
        config = ArchConfig(2, (1,) * blocks, 4, small_inputs=small_inputs)
        start = time.perf_counter()
        least = config.min_input_size()
        assert time.perf_counter() - start < 0.05
        assert config.last_block_size(least) == 1 and config.last_block_size(least - 1) == 0


def test_a_model_of_forty_blocks_saves_and_loads_at_once(tmp_path):
    model = de.DenseNet(growth_rate=2, block_config=(1,) * 40, num_init_features=4, small_inputs=True)
    model.save_pretrained(tmp_path / "deep")
    start = time.perf_counter()
    again = de.from_pretrained(tmp_path / "deep")
    assert time.perf_counter() - start < 10  # was: never (min_input_size tried 2**40 sizes)
    assert again.min_input_size() == 2**39
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])


@pytest.mark.parametrize(
    "blocks", [[10**9, 1, 1], [1, 1, 10**12], [3, 10**15, 3], [1] * 2 + [10**8], [10**18, 10**18, 10**18]]
)
def test_a_config_of_huge_layer_counts_next_to_small_weights_is_refused_at_once(tmp_path, blocks):
    model = de.densenet_bc(10, growth_rate=6)
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "block_config": blocks}))
    start = time.perf_counter()
    with pytest.raises(StateDictMismatchError, match=r"dense blocks of 1-1-1 layers, the architecture"):
        de.from_pretrained(tmp_path / "m")
    assert time.perf_counter() - start < 2
    # and the arithmetic alone, without a file: O(keys), whatever the config says
    start = time.perf_counter()
    with pytest.raises(StateDictMismatchError, match="1-1-1"):
        ArchConfig.from_json({**config, "block_config": blocks}).check_shapes(model.state_dict())
    assert time.perf_counter() - start < 0.5


def test_layer_keys_with_a_gap_or_a_huge_index_do_not_count_as_layers():
    config = densenet_bc_config(16, growth_rate=6)  # 2-2-2
    sd = de.densenet_bc(16, growth_rate=6).state_dict()
    renamed = {
        k.replace("denseblock2.denselayer2.", "denseblock2.denselayer999999999."): v for k, v in sd.items()
    }
    with pytest.raises(StateDictMismatchError, match=r"dense blocks of 2-\?-2 layers"):
        config.check_shapes(renamed)
    digits = {k.replace("denselayer1.", "denselayer" + "7" * 5000 + "."): v for k, v in sd.items()}
    with pytest.raises(StateDictMismatchError):  # not a ValueError from int() of 5000 digits
        config.check_shapes(digits)


def _folder_with(tmp_path, **fields):
    model = de.densenet_bc(10, growth_rate=6)
    folder = tmp_path / "edited"
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    text = json.dumps({**config, **fields})
    for marker, raw in (('"__1e400__"', "1e400"), ('"__-1e400__"', "-1e400")):
        text = text.replace(marker, raw)  # JSON numbers Python's json.dumps never writes
    (folder / "config.json").write_text(text)
    return folder


@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        ("growth_rate", "6", "'6'"),
        ("growth_rate", 6.0, "6.0"),
        ("growth_rate", None, "None"),
        ("growth_rate", True, "True"),
        ("growth_rate", "__1e400__", "inf"),
        ("growth_rate", 0, "0"),
        ("num_init_features", -12, "-12"),
        ("bn_size", [4], "[4]"),
        ("num_classes", "__-1e400__", "-inf"),
        ("num_classes", -1, "-1"),
        ("in_chans", {"c": 3}, "{'c': 3}"),
        ("block_config", [1, "1", 1], "'1'"),
        ("block_config", [1, 1.5, 1], "1.5"),
        ("block_config", [1, None, 1], "None"),
        ("block_config", [[[[[[[[[[1]]]]]]]]]], "[[[[[[...]]]]]]"),
        ("block_config", [], "[]"),
        ("block_config", "1,1,1", "'1,1,1'"),
        ("small_inputs", "yes", "'yes'"),
        ("small_inputs", 1, "1"),
    ],
)
def test_config_json_fields_of_the_wrong_type_name_the_folder_field_and_value(tmp_path, field, value, shown):
    folder = _folder_with(tmp_path, **{field: value})
    with pytest.raises(UsageError) as err:
        de.from_pretrained(folder)
    message = str(err.value)
    assert str(folder) in message and "config.json" in message and field in message, message
    assert shown in message, message
    assert len(message.splitlines()) == 1


def test_a_deeply_nested_field_is_shown_short_not_a_recursion_error(tmp_path):
    nested = 1
    for _ in range(500):  # JSON decodes this; a repr of it in an error message must not recurse
        nested = [nested]
    with pytest.raises(UsageError, match=r"block_config\[0\] must be an integer >= 1, found \[\[\[\[\[\["):
        de.from_pretrained(_folder_with(tmp_path, block_config=[nested, 1, 1]))


@pytest.mark.parametrize("value", [True, "max_saving", [0, 1, 1], None])
def test_a_memory_efficient_key_in_config_json_is_refused_not_applied(tmp_path, value):
    folder = _folder_with(tmp_path, memory_efficient=value)
    with pytest.raises(
        UsageError, match="memory_efficient=.* is not an architecture field .* chosen when loading"
    ):
        de.from_pretrained(folder)
    with pytest.raises(UsageError, match="memory_efficient"):
        de.from_pretrained(folder, memory_efficient="naive")


def _wrapped(depth: int, key: str = "state_dict") -> dict:
    obj = de.densenet_bc(10, growth_rate=6).state_dict()
    for _ in range(depth):
        obj = {key: obj}
    return obj


@pytest.mark.parametrize("depth", [33, 500, 5000])
def test_weights_wrapped_too_deep_are_one_sentence(tmp_path, depth):
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 4 * depth + 1000))  # torch.save's pickler recurses per level
    try:
        torch.save(_wrapped(depth, "model"), tmp_path / "deep.pth")
    finally:
        sys.setrecursionlimit(limit)
    with pytest.raises(CheckpointError, match="wrapped in more than 32 nested dicts"):
        read_checkpoint(tmp_path / "deep.pth")
    assert cli.main(["convert", str(tmp_path / "deep.pth"), str(tmp_path / "out"), "--quiet"]) == 2
    assert not (tmp_path / "out").exists()


def test_weights_wrapped_a_few_levels_deep_still_convert(tmp_path):
    torch.save(_wrapped(12, "module"), tmp_path / "wrapped.pth")
    assert read_checkpoint(tmp_path / "wrapped.pth").wrapper_key == "/".join(["module"] * 12)


def test_an_unverifiable_forty_block_conversion_is_refused_unless_asked_not_to_verify(tmp_path, capsys):
    model = de.DenseNet(growth_rate=2, block_config=(1,) * 40, num_init_features=4, small_inputs=True)
    torch.save(model.state_dict(), tmp_path / "forty.pth")
    assert cli.main(["convert", str(tmp_path / "forty.pth"), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot verify a 40-block DenseNet" in err and "--no-verify" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
    out = tmp_path / "out"
    assert cli.main(["convert", str(tmp_path / "forty.pth"), str(out), "--quiet", "--no-verify"]) == 0
    assert de.from_pretrained(out).arch_config.block_config == (1,) * 40


@pytest.mark.parametrize("digits", [19, 400, 5000, 20000])
def test_a_depth_of_many_digits_in_an_architecture_name_is_refused(digits, capsys):
    name = "densenet_bc_" + "4" * digits
    with pytest.raises(UsageError, match=f"a DenseNet-BC depth of {digits} digits"):
        resolve_arch(name)
    assert cli.main(["plan", "--arch", name, "--memory", "1GiB"]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_named_configs_round_trip_through_json_checks():
    for name in ("densenet121", "densenet161", "densenet_bc_100"):
        assert ArchConfig.from_json(get_config(name).to_json()) == get_config(name)


# -- round two's leftovers: nesting past the parser, timm's numbers, models too large to build -------


def _deep(depth: int, open_: str = "[", close: str = "]") -> str:
    return open_ * depth + close * depth


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (lambda cfg: cfg[:-1] + ', "block_config": ' + _deep(100_000) + "}", "'block_config'"),
        (lambda cfg: cfg[:-1] + ', "notes": {"a": ' + _deep(30_000, '{"b": ', "}") + "}}", "'notes'"),
        (lambda cfg: _deep(200_000), "top-level value"),
    ],
    ids=["list-100k", "dicts-30k", "top-level-200k"],
)
def test_a_config_json_nested_past_the_parser_is_one_sentence_naming_the_field(tmp_path, text, field):
    folder = _folder_with(tmp_path)
    config = folder / "config.json"
    config.write_text(text(config.read_text().strip()))
    start = time.perf_counter()
    with pytest.raises(UsageError) as err:  # was: RecursionError
        de.from_pretrained(folder)
    assert time.perf_counter() - start < 2
    message = str(err.value)
    assert str(folder) in message and "config.json" in message and field in message, message
    assert "nested more than" in message and len(message) < 300


def test_a_deeply_nested_config_json_is_refused_by_convert_too(tmp_path, capsys):
    folder = _folder_with(tmp_path)
    (folder / "config.json").write_text('{"pretrained_cfg": ' + _deep(50_000) + "}")
    assert cli.main(["convert", str(folder), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "'pretrained_cfg' is nested more than" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


_TIMM = {"architecture": "densenet121", "num_classes": 1000, "global_pool": "avg", "pretrained_cfg": {}}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"num_classes": "1000"}, r"config.json's num_classes must be an integer >= 0, found '1000'"),
        ({"num_classes": 10.0}, "num_classes must be an integer >= 0, found 10.0"),
        ({"num_classes": True}, "num_classes must be an integer >= 0, found True"),
        ({"num_classes": None}, "num_classes must be an integer >= 0, found None"),
        ({"num_classes": -3}, "num_classes must be an integer >= 0, found -3"),
        ({"num_classes": "__1e400__"}, "num_classes must be an integer >= 0, found inf"),
        (
            {"num_classes": "__drop__", "pretrained_cfg": {"num_classes": [7]}},
            r"pretrained_cfg.num_classes must be an integer >= 0, found \[7\]",
        ),
        ({"pretrained_cfg": [1]}, r"pretrained_cfg must be a JSON object, found \[1\]"),
        ({"model_args": {"proj_drop_rate": "0.1"}}, r"model_args.proj_drop_rate must be a number in \[0, 1\), found '0.1'"),
        ({"model_args": {"proj_drop_rate": 1.5}}, r"proj_drop_rate must be a number in \[0, 1\), found 1.5"),
        ({"model_args": {"proj_drop_rate": "__nan__"}}, r"proj_drop_rate must be a number in \[0, 1\), found nan"),
        ({"model_args": {"proj_drop_rate": False}}, r"proj_drop_rate must be a number in \[0, 1\), found False"),
    ],
)
def test_timm_config_numbers_are_checked_before_int_or_float(tmp_path, edit, message):
    folder = tmp_path / "timm-densenet121"
    folder.mkdir()
    text = json.dumps({k: v for k, v in {**_TIMM, **edit}.items() if v != "__drop__"})
    for marker, raw in (('"__1e400__"', "1e400"), ('"__nan__"', "NaN")):
        text = text.replace(marker, raw)
    (folder / "config.json").write_text(text)
    de.densenet_bc(10, growth_rate=6).save_pretrained(tmp_path / "w")  # any weights: never reached
    (folder / "model.safetensors").write_bytes((tmp_path / "w" / "model.safetensors").read_bytes())
    with pytest.raises(UsageError, match=message) as err:  # was: ValueError/TypeError from int()/float()
        de.from_pretrained(folder)
    assert str(folder) in str(err.value)


@pytest.mark.parametrize(
    "build",
    [
        lambda: de.densenet_bc(40, growth_rate=10**6),
        lambda: de.DenseNet(num_classes=10**12),
        lambda: de.DenseNet(growth_rate=4, block_config=(10**7, 1), num_init_features=8),
        lambda: de.create_model("densenet121", num_classes=2**40),
    ],
    ids=["growth-1e6", "classes-1e12", "layers-1e7", "create_model-classes-2**40"],
)
def test_a_model_too_large_for_the_machine_is_refused_before_allocating(build):
    start = time.perf_counter()
    with pytest.raises(UsageError, match=r"would have [\d,]+ parameters, .* more than the .* of memory of cpu"):
        build()
    assert time.perf_counter() - start < 0.5  # the count is closed form; nothing was allocated


def test_the_size_limit_is_the_devices_memory(monkeypatch):
    from densenet_efficient.models import parameters

    config = densenet_bc_config(40)
    n = parameters.count_parameters(config)
    monkeypatch.setattr(parameters, "device_memory", lambda device: 4 * n)  # exactly fits in fp32
    assert parameters.check_model_size(config) == n
    with pytest.raises(UsageError, match="in float64 before any gradient"):
        parameters.check_model_size(config, dtype=torch.float64)
    monkeypatch.setattr(parameters, "device_memory", lambda device: None)  # unknown: never refused
    assert parameters.check_model_size(densenet_bc_config(40, 10**6)) > 10**15
