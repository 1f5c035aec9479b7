"""``config.json`` of a model folder, both ways: this package's fields and timm's.

Written (:func:`hub_config`): timm's fields (``architecture``, ``num_classes``, ``num_features``,
``global_pool``, ``pretrained_cfg``), then this package's architecture fields and ``drop_rate``, so
``timm.create_model("local-dir:DIR", pretrained=True)`` loads the folders of the architectures
timm has. Read (:func:`folder_kwargs`): either format, checked field by field before anything is
built from it; timm's DenseNet folders (``timm/densenet121.tv_in1k``) become this package's
constructor arguments. ``memory_efficient`` is never written: it is chosen when loading.

>>> import densenet_efficient as de
>>> from densenet_efficient.models.hub.config_json import folder_kwargs, hub_config
>>> kwargs, pretrained_cfg = folder_kwargs(hub_config(de.densenet_bc_100()), "example")
>>> kwargs["growth_rate"], kwargs["block_config"]
(12, (16, 16, 16))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn as nn

from ...errors import UsageError, check_fraction, check_int, shown
from ..config import ARCHITECTURES, ArchConfig, get_config
from ..imagenet import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["PRETRAINED_CFG_KEYS", "default_pretrained_cfg", "folder_kwargs", "hub_config"]

#: The fields of timm's ``PretrainedCfg`` this package reads and writes (timm refuses unknown ones).
PRETRAINED_CFG_KEYS = (
    "architecture", "tag", "hf_hub_id", "url", "custom_load", "input_size", "test_input_size",
    "min_input_size", "fixed_input_size", "interpolation", "crop_pct", "test_crop_pct", "crop_mode",
    "mean", "std", "num_classes", "label_offset", "label_names", "label_descriptions", "pool_size",
    "test_pool_size", "first_conv", "classifier", "license", "description", "origin_url", "paper_name",
    "paper_ids", "notes",
)  # fmt: skip


def default_pretrained_cfg(config: ArchConfig) -> dict[str, Any]:
    """timm's description of a model's inputs for ``config`` before any weights say otherwise."""
    size, least = config.default_resolution, config.min_input_size()
    pool = config.last_block_size(size)
    return {
        "architecture": config.architecture_name(ignore_classes=True) or "densenet",
        "input_size": (config.in_chans, size, size),
        "min_input_size": (config.in_chans, least, least),
        "fixed_input_size": False,
        "interpolation": "bilinear",
        "crop_pct": 1.0 if config.small_inputs else 0.875,
        "crop_mode": "center",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "num_classes": config.num_classes,
        "pool_size": (pool, pool),
        "first_conv": "features.conv0",
        "classifier": "classifier",
    }


def _clean_pretrained_cfg(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-ready part of a ``pretrained_cfg`` timm accepts (tuples as lists, no Nones)."""
    out = {}
    for key in PRETRAINED_CFG_KEYS:
        value = cfg.get(key)
        if value is not None:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def hub_config(model: nn.Module) -> dict[str, Any]:
    """``config.json`` for ``model``: timm's fields (``architecture``, ``num_classes``,
    ``num_features``, ``pretrained_cfg``), then this package's architecture fields and ``drop_rate``;
    never ``memory_efficient``, which is chosen when loading."""
    cfg = model.arch_config
    pretrained_cfg = _clean_pretrained_cfg({**model.pretrained_cfg, "num_classes": cfg.num_classes})
    data = {
        "architecture": pretrained_cfg.pop("architecture", None)
        or cfg.architecture_name(ignore_classes=True)
        or "densenet",
        "num_classes": cfg.num_classes,
        "num_features": model.num_features,
        "global_pool": "avg",
        "pretrained_cfg": pretrained_cfg,
    }
    if cfg.in_chans != 3:
        data["model_args"] = {"in_chans": cfg.in_chans}  # timm rebuilds conv0 from model_args
    return {**data, **cfg.to_json(), "drop_rate": model.drop_rate}


def folder_kwargs(config: Any, source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """DenseNet constructor arguments (``drop_rate`` included) and the ``pretrained_cfg`` from a
    ``config.json`` of either format, every field checked: a bad one is a :class:`UsageError`
    naming ``source``, the field and the value."""
    if not isinstance(config, Mapping):
        raise UsageError(f"{source}: config.json must hold a JSON object, found {type(config).__name__}")
    pretrained_cfg = config.get("pretrained_cfg") or {}
    if not isinstance(pretrained_cfg, Mapping):
        raise UsageError(f"{source}: pretrained_cfg must be a JSON object, found {shown(pretrained_cfg)}")
    if "growth_rate" in config:  # this package's fields
        kwargs = ArchConfig.from_json(config, source=f"{source}: config.json").to_kwargs()
        kwargs["drop_rate"] = check_fraction(config.get("drop_rate", 0.0), f"{source}: config.json: drop_rate")
        return kwargs, dict(pretrained_cfg)
    arch = config.get("architecture")
    if arch is None:
        raise UsageError(
            f"{source}: config.json has neither DenseNet fields (growth_rate, block_config, ...) nor an "
            "'architecture'; expected a folder written by save_pretrained/save_hub_folder or a timm DenseNet repo"
        )
    return _timm_kwargs(config, str(arch), pretrained_cfg, source), dict(pretrained_cfg)


#: timm ``model_args`` that describe what this package's DenseNet computes anyway: name -> test.
_TIMM_EQUIVALENT_ARGS = {
    "in_chans": lambda v: v == 3,
    "stem_type": lambda v: not v,
    "aa_layer": lambda v: not v,
    "global_pool": lambda v: v == "avg",
    "act_layer": lambda v: v == "relu",
    # read below, or chosen by the caller
    "drop_rate": lambda v: True,
    "proj_drop_rate": lambda v: True,
    "memory_efficient": lambda v: True,
    "num_classes": lambda v: True,
}


def _timm_kwargs(
    config: Mapping[str, Any], arch: str, pretrained_cfg: Mapping[str, Any], source: str
) -> dict[str, Any]:
    """timm's DenseNets (densenet121/161/169/201) have torchvision's module names and computation:
    BatchNormAct2d is a BatchNorm2d with the ReLU fused in, so its state_dict keys are the same."""
    if arch not in ARCHITECTURES or ARCHITECTURES[arch].small_inputs:
        supported = ", ".join(n for n, c in ARCHITECTURES.items() if not c.small_inputs)
        raise UsageError(
            f"{source}: timm architecture {arch!r} is not supported; expected one of {supported}"
        )
    model_args = config.get("model_args") or {}
    if not isinstance(model_args, Mapping):
        raise UsageError(f"{source}: timm's model_args must be a JSON object, found {model_args!r}")
    unsupported = {
        k: v for k, v in model_args.items() if not _TIMM_EQUIVALENT_ARGS.get(k, lambda _: False)(v)
    }
    pool = config.get("global_pool", "avg")
    if pool != "avg":
        unsupported["global_pool"] = pool
    if unsupported:
        raise UsageError(f"{source}: timm options {unsupported} have no equivalent in this package's {arch}")
    kwargs = get_config(arch).to_kwargs()
    # typed and ranged before anything is built from them (a string, float, bool or 1e400 where
    # timm writes an integer: the error names the file, the field and the value)
    field = "num_classes" if "num_classes" in config else "pretrained_cfg.num_classes"
    classes = config.get("num_classes", pretrained_cfg.get("num_classes", 1000))
    kwargs["num_classes"] = check_int(classes, f"{source}: config.json's {field}", 0)
    kwargs["drop_rate"] = check_fraction(  # timm's per-layer dropout
        model_args.get("proj_drop_rate", 0.0), f"{source}: config.json's model_args.proj_drop_rate"
    )
    return kwargs
