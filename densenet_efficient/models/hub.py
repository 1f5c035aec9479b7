"""The DenseNet's Hugging Face Hub support: its folder format and the mixin its class inherits.

A folder (or Hub repo) holds ``model.safetensors`` (torchvision's key layout), ``config.json``
and ``README.md``, a model card with Hub metadata and a usage snippet. ``config.json`` describes
the architecture twice over: this package's fields (``growth_rate``, ``block_config``, ...) and
timm's (``architecture``, ``num_classes``, ``num_features``, ``pretrained_cfg``), so timm loads
the folders of the architectures it has (``timm.create_model("local-dir:DIR", pretrained=True)``)
and this package loads timm's DenseNet folders (``timm/densenet121.tv_in1k``). How dense blocks
execute (``memory_efficient``) is not saved: it is chosen when loading.

The model class inherits :class:`DenseNetHubMixin`: huggingface_hub's ``PyTorchModelHubMixin``
with this format in its hooks (``_save_pretrained``, ``_from_pretrained``), so the mixin's
``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` and their arguments work as they do
for any mixin model. This module knows models only through what every DenseNet offers
(``arch_config``, ``state_dict``, ``pretrained_cfg``, the class itself): it imports nothing from
:mod:`.densenet`.

>>> import densenet_efficient as de
>>> model = de.densenet_bc_100()

    model.save_pretrained("out/bc100")
    de.from_pretrained("out/bc100", memory_efficient=True)
    de.save_hub_folder(model, "out/bc100", provenance={"trained": "train"}, overwrite=True)
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from huggingface_hub import PyTorchModelHubMixin

from ..errors import UsageError, check_fraction, check_int, shown
from ..io.atomic import atomic_write, staged_folder
from ..io.checkpoint import read_checkpoint
from ..io.json_file import read_json_object
from ..io.state_dict import StateDictMismatchError, load_state_dict_into
from .config import ARCHITECTURES, IMAGENET_MEAN, IMAGENET_STD, ArchConfig, get_config

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "DenseNetHubMixin",
    "default_pretrained_cfg",
    "hub_config",
    "load_hub_folder",
    "model_card",
    "save_hub_folder",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PICKLE_WEIGHTS_NAME = "pytorch_model.bin"  # older timm repos; loaded with weights_only=True
CARD_NAME = "README.md"
#: This project's GitHub repository, the one ``torch.hub.load`` takes: the organisation is named here
#: only (README.md and hubconf.py quote it; ``tests/test_hubconf.py`` checks they agree). Pin a
#: release with a tag, ``torch.hub.load(f"{HUB_REPO}:v0.1.0", ...)``; a checkout loads with
#: ``torch.hub.load("path/to/checkout", ..., source="local")``.
HUB_REPO = "densenet-efficient/efficient_densenet"
PACKAGE_LICENSE = "mit"  # the code's licence; weights carry their own in pretrained_cfg

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


# -- writing -----------------------------------------------------------------------------------------


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


#: The model card (``README.md``), a Jinja template as huggingface_hub's mixin expects
#: (``model_card_template=`` in :class:`DenseNetHubMixin`'s header); :func:`_card_fields` fills it.
MODEL_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ description }}: {{ parameters }} parameters, {{ num_classes }} classes. A memory-efficient DenseNet from [densenet_efficient]({{ repo_url }}) with torchvision's exact `state_dict` layout.

## Usage

```python
import torch
import densenet_efficient as de

model = de.from_pretrained("{{ repo_id }}", memory_efficient=True).eval()
with torch.no_grad():
    logits = model(torch.randn(1, 3, {{ size }}, {{ size }}))
```

`memory_efficient` (`False`/"naive", `True`/"efficient", "max_saving") is chosen at load time: it changes training memory and speed, never the weights.

## Model details

| field | value |
|---|---|
{% for key, value in details %}| {{ key }} | `{{ value }}` |
{% endfor %}| parameters | {{ parameters }} |
| minimum input size | {{ min_size }}x{{ min_size }} |
{% if provenance %}
## Provenance

{% for key, value in provenance %}- **{{ key }}**: {{ value }}
{% endfor %}{% endif %}"""


def _card_data(model: nn.Module, license: str | None) -> Any:
    """The card's YAML metadata: the class header's, with this model's licence (its weights', not
    the code's) and the tags of where its weights came from."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(**type(model)._hub_mixin_info.model_card_data.to_dict())
    data.license = (license or model.pretrained_cfg.get("license") or PACKAGE_LICENSE).lower()
    origin = str(model.pretrained_cfg.get("origin_url") or model.pretrained_cfg.get("hf_hub_id") or "")
    for source, tag in (("download.pytorch.org", "torchvision"), ("timm/", "timm")):
        if source in origin and tag not in data.tags:
            data.tags = [*data.tags, tag]
    return data


def _card_fields(
    model: nn.Module, provenance: Mapping[str, Any] | None, repo_id: str | None
) -> dict[str, Any]:
    """The values :data:`MODEL_CARD_TEMPLATE` shows, each formatted as it appears."""
    cfg = model.arch_config
    params = f"{sum(p.numel() for p in model.parameters()):,}"
    title = cfg.architecture_name(ignore_classes=True)
    return {
        "title": title or f"DenseNet (k={cfg.growth_rate}, blocks={tuple(cfg.block_config)})",
        "description": cfg.describe(),
        "parameters": params,
        "num_classes": cfg.num_classes,
        "repo_url": type(model)._hub_mixin_info.repo_url,
        "repo_id": repo_id or "<repo id or local folder>",
        "size": cfg.default_resolution,
        "details": [(k, json.dumps(v)) for k, v in hub_config(model).items()],
        "min_size": cfg.min_input_size(),
        "provenance": [
            (k, v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str))
            for k, v in (provenance or {}).items()
        ],
    }


def model_card(
    model: nn.Module,
    *,
    provenance: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
    license: str | None = None,
) -> str:
    """The README.md of a Hub folder: YAML metadata, a summary, a usage snippet and (optionally)
    provenance; ``model.generate_model_card(...)`` as text."""
    return str(model.generate_model_card(provenance=provenance, repo_id=repo_id, license=license))


def _write_model_files(model: nn.Module, folder: Path) -> None:
    """``model.safetensors`` then ``config.json`` into ``folder``, each atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
    atomic_write(folder / CONFIG_NAME, (json.dumps(hub_config(model), indent=2) + "\n").encode())


def save_hub_folder(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    provenance: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    repo_id: str | None = None,
    license: str | None = None,
) -> Path:
    """Write ``model.safetensors`` + ``config.json`` + ``README.md`` (with ``provenance``) into ``out_dir``.

    The files are staged in a temporary folder beside ``out_dir``: a new ``out_dir`` appears
    complete or not at all. An existing non-empty ``out_dir`` raises :class:`FileExistsError`
    unless ``overwrite=True``; then each of the three files is replaced atomically and nothing
    else in the folder is touched. ``provenance`` (e.g. source file, sha256, date, verification
    result) becomes a section of the model card; ``repo_id`` is used in its usage snippet.
    Returns the folder.

        save_hub_folder(model, "hub/densenet121", provenance={"source": "densenet121-a639ec97.pth"})
    """
    if not isinstance(model, DenseNetHubMixin):
        raise TypeError(f"save_hub_folder expects a densenet_efficient.DenseNet, got {type(model).__name__}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; expected a folder path for the Hub files")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pass overwrite=True to replace it")
    card = model_card(model, provenance=provenance, repo_id=repo_id, license=license)
    with staged_folder(out, replace=True) as tmp:
        _write_model_files(model, tmp)
        (tmp / CARD_NAME).write_text(card, encoding="utf-8")
    return out


# -- reading -----------------------------------------------------------------------------------------


def _model_kwargs(config: Any, source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """DenseNet constructor arguments and the ``pretrained_cfg`` from our config.json or timm's."""
    if not isinstance(config, Mapping):
        raise UsageError(f"{source}: config.json must hold a JSON object, found {type(config).__name__}")
    pretrained_cfg = config.get("pretrained_cfg") or {}
    if not isinstance(pretrained_cfg, Mapping):
        raise UsageError(f"{source}: pretrained_cfg must be a JSON object, found {pretrained_cfg!r}")
    if "growth_rate" in config:  # this package's fields
        kwargs = ArchConfig.from_json(config, source=f"{source}: config.json").to_kwargs()
        kwargs["drop_rate"] = check_fraction(config.get("drop_rate", 0.0), f"{source}: drop_rate")
        return kwargs, dict(pretrained_cfg)
    arch = config.get("architecture")
    if arch is None:
        raise UsageError(
            f"{source}: config.json has neither DenseNet fields (growth_rate, block_config, ...) nor an "
            "'architecture'; expected a folder written by save_pretrained/save_hub_folder or a timm DenseNet repo"
        )
    return _timm_kwargs(config, str(arch), source), dict(pretrained_cfg)


def _timm_kwargs(config: Mapping[str, Any], arch: str, source: str) -> dict[str, Any]:
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
        k: v
        for k, v in model_args.items()
        if not (
            (k == "in_chans" and v == 3)
            or (k in ("stem_type", "aa_layer") and not v)
            or (k == "global_pool" and v == "avg")
            or (k == "act_layer" and v == "relu")
            or k in ("drop_rate", "proj_drop_rate", "memory_efficient", "num_classes")
        )
    }
    pool = config.get("global_pool", "avg")
    if pool != "avg":
        unsupported["global_pool"] = pool
    if unsupported:
        raise UsageError(f"{source}: timm options {unsupported} have no equivalent in this package's {arch}")
    kwargs = get_config(arch).to_kwargs()
    pretrained_cfg = config.get("pretrained_cfg") or {}
    if not isinstance(pretrained_cfg, Mapping):
        raise UsageError(f"{source}: pretrained_cfg must be a JSON object, found {shown(pretrained_cfg)}")
    # typed and ranged before anything is built from them (a string, float, bool or 1e400 where
    # timm writes an integer: the error names the file, the field and the value)
    field = "num_classes" if "num_classes" in config else "pretrained_cfg.num_classes"
    classes = config.get("num_classes", pretrained_cfg.get("num_classes", 1000))
    kwargs["num_classes"] = check_int(classes, f"{source}: config.json's {field}", 0)
    kwargs["drop_rate"] = check_fraction(  # timm's per-layer dropout
        model_args.get("proj_drop_rate", 0.0), f"{source}: config.json's model_args.proj_drop_rate"
    )
    return kwargs


def _offline_reason(local_files_only: bool) -> str:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1 forbids downloading it"
    if local_files_only:
        return "local_files_only=True forbids downloading it"
    return "the Hugging Face Hub could not be reached"


def _hub_file(repo_id: str, filename: str, opts: dict[str, Any]) -> str:
    from huggingface_hub import hf_hub_download

    from .. import __version__

    try:
        return hf_hub_download(
            repo_id, filename, library_name="densenet_efficient", library_version=__version__, **opts
        )
    except Exception as err:
        mapped = _hub_error(err, repo_id, opts, filename)
        if mapped is None:
            raise
        raise mapped from None


@dataclass(frozen=True)
class _HubFiles:
    """Where one load reads from, found once (:func:`_locate`): the name the caller gave (for
    messages), its ``config.json`` and its weights file."""

    source: str
    config: Path
    weights: Path


def _locate(name_or_path: str, opts: dict[str, Any]) -> _HubFiles:
    """The files of a local folder or a Hub repo (downloaded or from the cache)."""
    from huggingface_hub.errors import RemoteEntryNotFoundError

    local = Path(name_or_path)
    if local.is_dir():
        config = local / CONFIG_NAME
        if not config.exists():  # anything else there is refused when read (a FIFO, a folder)
            raise FileNotFoundError(
                f"{local} has no {CONFIG_NAME}; expected a folder written by save_pretrained/save_hub_folder "
                f"({CONFIG_NAME} + {WEIGHTS_NAME}) or a copy of a timm DenseNet repo"
            )
        for name in (WEIGHTS_NAME, PICKLE_WEIGHTS_NAME):
            if (local / name).exists():
                return _HubFiles(name_or_path, config, local / name)
        raise FileNotFoundError(f"{local} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    if local.exists():
        raise FileNotFoundError(f"{local} is a file; expected a folder or a Hugging Face repo id")
    _check_hub_lookup(name_or_path, opts)
    config = Path(_hub_file(name_or_path, CONFIG_NAME, opts))
    try:
        weights = Path(_hub_file(name_or_path, WEIGHTS_NAME, opts))
    except RemoteEntryNotFoundError:  # older timm repos ship only the pickle
        weights = Path(_hub_file(name_or_path, PICKLE_WEIGHTS_NAME, opts))
    return _HubFiles(name_or_path, config, weights)


def _may_be_a_folder(name: str) -> bool:
    """Whether a valid repo id may as well be a mistyped folder here: it has no namespace
    ("my-densenet", as ``save_pretrained`` names folders) or its first component is a folder here
    ("runs/flowers/bset" next to ./runs)."""
    first, slash, _ = name.partition("/")
    return not slash or Path(first).is_dir()


def _check_hub_lookup(name: str, opts: Mapping[str, Any]) -> None:
    """Refuse at once a name that is not a folder here, may be a mistyped one, is not cached and
    cannot be looked up on the Hub.

    Without this, ``hf_hub_download`` retries an unreachable Hub five times with backoff (~23 s)
    before its error; a typo in a local path deserves the answer at once. One request to the Hub
    (``repo_exists``) tells an unreachable Hub apart; names that cannot be folders here
    ("timm/densenet121.tv_in1k") keep huggingface_hub's own retries.
    """
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    if constants.HF_HUB_OFFLINE or opts.get("local_files_only") or not _may_be_a_folder(name):
        return  # offline: huggingface_hub answers from the cache at once, without retrying
    try:
        cached = try_to_load_from_cache(
            name, CONFIG_NAME, cache_dir=opts.get("cache_dir"), revision=opts.get("revision")
        )
    except HFValidationError:
        return  # not a repo id at all: _hub_file says so in one sentence
    if isinstance(cached, str):
        return
    where = f"no folder {name!r} in {Path.cwd()}"
    try:
        exists = HfApi().repo_exists(name, token=opts.get("token"))
    except Exception as err:  # any failure to ask (no network, proxy, 5xx): the typo is likelier
        reason = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        raise FileNotFoundError(
            f"{where}, and the Hugging Face Hub could not be reached to look it up as a repo id ({reason})"
        ) from None
    if not exists:
        raise FileNotFoundError(
            f"{where}, and no Hugging Face repo {name!r} (or it is private: log in with `hf auth login`)"
        )


_DOWNLOAD_OPTIONS = ("revision", "cache_dir", "force_download", "token", "local_files_only", "proxies")


def _read_config(path: Path, source: str) -> dict[str, Any]:
    """The folder's config.json as a dict (invalid, too deeply nested or not an object: one
    sentence naming the folder, the file and, for nesting, the field)."""
    return read_json_object(path, source)


def _same(value: Any, saved: Any) -> bool:
    """Whether a keyword argument repeats what config.json says (the mixin passes both along)."""
    if isinstance(value, (tuple, list)) and isinstance(saved, (tuple, list)):
        return list(value) == list(saved)
    # the mixin passes config.json's own NaN along, and NaN != NaN: it is the file's value (refused
    # naming the file when read), not the caller's choice
    return value is saved or value == saved or (value != value and saved != saved)


def load_hub_folder(
    repo_id_or_path: str | os.PathLike,
    *,
    model_cls: type[nn.Module],
    memory_efficient: bool | str = False,
    num_classes: int | None = None,
    strict: bool = True,
    map_location: str | torch.device = "cpu",
    **opts: Any,
) -> nn.Module:
    """Build ``model_cls`` from a Hub repo id or a local folder and load it, in eval mode.

    Reads folders written by ``save_pretrained`` / :func:`save_hub_folder` and timm's DenseNet repos.
    The weights must fit ``config.json`` exactly (a mismatch raises
    :class:`~densenet_efficient.io.state_dict.StateDictMismatchError` naming the keys and, for the
    classifier, both class counts). An explicit ``num_classes`` different from the folder's loads
    everything but the classifier and warns (fine-tuning). ``strict=False`` loads what fits and
    leaves the rest initialised, as ``nn.Module.load_state_dict(strict=False)``. ``opts``:
    ``revision``, ``cache_dir``, ``force_download``, ``token``, ``local_files_only``, ``proxies``.
    """
    source = os.fspath(repo_id_or_path)
    files = _locate(source, opts)
    return _load_files(
        files,
        _read_config(files.config, source),
        model_cls=model_cls,
        memory_efficient=memory_efficient,
        num_classes=num_classes,
        strict=strict,
        map_location=map_location,
    )


def _load_files(
    files: _HubFiles,
    config: dict[str, Any],
    *,
    model_cls: type[nn.Module],
    memory_efficient: bool | str,
    num_classes: int | None,
    strict: bool,
    map_location: str | torch.device,
) -> nn.Module:
    """:func:`load_hub_folder` once the files are found and ``config.json`` is read."""
    source, weights_name = files.source, files.weights.name
    kwargs, pretrained_cfg = _model_kwargs(config, source)
    state_dict = read_checkpoint(files.weights).state_dict
    _check_classes(state_dict, kwargs["num_classes"], source, weights_name)
    try:  # before building: a config asking for gigabytes is refused against a small file at once
        ArchConfig(**{k: v for k, v in kwargs.items() if k != "drop_rate"}).check_shapes(state_dict)
    except StateDictMismatchError as e:
        raise StateDictMismatchError(
            f"{source}: {weights_name} does not match its {CONFIG_NAME}: {e}"
        ) from None
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = model_cls(**kwargs, memory_efficient=memory_efficient)
    model.pretrained_cfg = {**model.pretrained_cfg, **pretrained_cfg, "num_classes": model.num_classes}
    try:
        if strict:
            load_state_dict_into(model, state_dict, source=source)
        else:
            model.load_state_dict(state_dict, strict=False)
    except StateDictMismatchError as e:
        raise StateDictMismatchError(
            f"{source}: {weights_name} does not match its {CONFIG_NAME}: {e}"
        ) from None
    return model.to(map_location).eval()


def _check_classes(state_dict: Mapping[str, Any], num_classes: int, source: str, weights_name: str) -> None:
    """A config.json whose class count contradicts its weights is an error, never a silent new head."""
    head = state_dict.get("classifier.weight")
    found = 0 if head is None else int(head.shape[0])
    if found != num_classes:
        raise StateDictMismatchError(
            f"{source}: {CONFIG_NAME} says num_classes={num_classes} but {weights_name} holds a classifier "
            f"with {found} outputs; fix the folder, or pass num_classes= to re-initialise the head"
        )


def _hub_error(err: Exception, name: str, opts: Mapping[str, Any], filename: str = "") -> Exception | None:
    """One sentence for the huggingface_hub errors a repo id can raise, or None for other errors."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        cache = opts.get("cache_dir") or constants.HF_HUB_CACHE
        return FileNotFoundError(
            f"cannot load {name!r}: {f'its {filename} is' if filename else 'its files are'} not in the "
            f"Hugging Face cache ({cache}) and "
            f"{_offline_reason(bool(opts.get('local_files_only')))}"
        )
    if isinstance(err, OSError) and err.errno in _DISK_FULL:
        from ..io.download import DownloadError

        cache = opts.get("cache_dir") or constants.HF_HUB_CACHE
        error = DownloadError(
            f"cannot store {filename or 'the files'} of {name!r} in the Hugging Face cache ({cache}): "
            f"{err.strerror or err}; make room there, or set HF_HUB_CACHE to another folder"
        )
        error.errno = err.errno
        return error
    if isinstance(err, HFValidationError):
        return FileNotFoundError(
            f"{name!r} is neither an existing local folder nor a valid Hugging Face repo id (org/name)"
        )
    if isinstance(err, RevisionNotFoundError):
        return UsageError(f"repo {name!r} has no revision {opts.get('revision')!r}")
    if isinstance(err, RepositoryNotFoundError):
        return FileNotFoundError(
            f"no Hugging Face repo {name!r} (or it is private or gated: log in with `hf auth login`)"
        )
    return None


_MODEL_CARD_KWARGS = ("provenance", "repo_id", "license")
#: errno values of a cache that cannot take a download (full, over quota, read-only, not ours)
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


class DenseNetHubMixin(
    PyTorchModelHubMixin,
    library_name="densenet_efficient",
    tags=["image-classification", "densenet", "memory-efficient", "torchvision-compatible"],
    license=PACKAGE_LICENSE,
    repo_url=f"https://github.com/{HUB_REPO}",
    paper_url="https://arxiv.org/abs/1707.06990",
    pipeline_tag="image-classification",
    model_card_template=MODEL_CARD_TEMPLATE,
):
    """huggingface_hub's ``PyTorchModelHubMixin`` with this package's folder format in its hooks.

    ``_save_pretrained`` writes ``model.safetensors`` + ``config.json``, ``_from_pretrained``
    builds and loads strictly, and the card is :data:`MODEL_CARD_TEMPLATE`. ``from_pretrained``
    takes the mixin's arguments (``revision``, ``cache_dir``, ``force_download``, ``proxies``,
    ``resume_download``, ``token``, ``local_files_only``, ``map_location``, ``strict``) plus
    ``memory_efficient`` and ``num_classes``; loading is strict unless ``strict=False``.
    ``save_pretrained`` into an existing folder replaces this package's files and leaves every
    other file there alone, as the mixin does. Where a public method is overridden, it checks what
    the mixin would act on unchecked and then calls it; each says why.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """Load a Hub repo or local folder (ours, or timm's DenseNet repos); see :func:`load_hub_folder`.

        model = DenseNet.from_pretrained("org/densenet121", memory_efficient=True)
        """
        # Overridden because the mixin reads config.json before any hook runs, unchecked (bad JSON,
        # a list or a missing file would be its own errors) and fetching it by itself. Here the files
        # are found once and config.json is checked; the mixin then reads it from the folder found
        # (for a Hub repo, its cache snapshot) and hands the same files to `_from_pretrained`.
        name = os.fspath(pretrained_model_name_or_path)
        files = _locate(name, {k: kwargs[k] for k in _DOWNLOAD_OPTIONS if kwargs.get(k) is not None})
        _read_config(files.config, name)
        return super().from_pretrained(files.config.parent, _files=files, **kwargs)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        proxies: dict | None = None,
        resume_download: bool | None = None,
        config: dict | None = None,
        map_location: str | torch.device = "cpu",
        strict: bool = True,
        memory_efficient: bool | str = False,
        _files: _HubFiles | None = None,
        **model_kwargs: Any,
    ):
        if _files is None:  # called without from_pretrained: find the files here
            opts = {"revision": revision, "cache_dir": cache_dir, "force_download": force_download}
            opts.update(token=token, local_files_only=local_files_only)
            _files = _locate(model_id, {**opts, **({"proxies": proxies} if proxies is not None else {})})
        source = _files.source
        # The mixin fills model_kwargs from config.json for every __init__ argument it names; only
        # a value that differs from the file is the caller's own choice.
        saved = config if isinstance(config, Mapping) else _read_config(_files.config, source)
        chosen = {k: v for k, v in model_kwargs.items() if k not in saved or not _same(v, saved[k])}
        num_classes = chosen.pop("num_classes", None)
        if chosen:
            raise UsageError(
                f"{source}: from_pretrained cannot change the saved architecture "
                f"({', '.join(f'{k}={v!r}' for k, v in chosen.items())}); it accepts memory_efficient, "
                "num_classes, map_location, strict and the Hub download options"
            )
        return _load_files(
            _files,
            dict(saved),
            model_cls=cls,
            memory_efficient=memory_efficient,
            num_classes=num_classes,
            strict=strict,
            map_location=map_location,
        )

    def _save_pretrained(self, save_directory: Path) -> None:
        _write_model_files(self, Path(save_directory))

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        config: Any = None,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        model_card_kwargs: dict[str, Any] | None = None,
        **push_to_hub_kwargs: Any,
    ) -> str | None:
        """The mixin's ``save_pretrained``, after checking its arguments (nothing is written otherwise),
        written through :func:`~densenet_efficient.io.atomic.staged_folder` as :func:`save_hub_folder` is.

        ``config.json`` is derived from the architecture, so ``config`` is refused;
        ``model_card_kwargs`` may hold ``provenance`` (a dict), ``repo_id`` and ``license``.
        A new ``save_directory`` appears complete or not at all; in an existing one this package's
        files are replaced, each atomically (a reader finds the old or the new file, never none),
        a model card already there is kept (as the mixin does), nothing else is touched. A kill or
        a full disk half-way leaves the folder as it was.
        """
        # Overridden because the mixin creates the folder and deletes its config.json before
        # `_save_pretrained` runs, so a kill or a full disk in between left a folder that no longer
        # loads. The mixin writes into a staging folder instead, moved into place when complete.
        _check_save_args(config, model_card_kwargs)
        push_to_hub_kwargs.pop("overwrite", None)  # accepted for compatibility: folders are updated in place
        out = Path(save_directory)
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"{out} is a file; expected a folder path for the Hub files")
        keep_card = (out / CARD_NAME).exists()
        with staged_folder(out, replace=True) as tmp:
            super().save_pretrained(tmp, model_card_kwargs=model_card_kwargs)
            if keep_card:  # the mixin never overwrites a model card: neither does the move
                (tmp / CARD_NAME).unlink(missing_ok=True)
        if push_to_hub:  # as the mixin's own save_pretrained does, once the folder is complete
            return self.push_to_hub(
                repo_id=repo_id or out.name, model_card_kwargs=model_card_kwargs, **push_to_hub_kwargs
            )
        return None

    def push_to_hub(
        self,
        repo_id: str,
        *,
        config: Any = None,
        model_card_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> str:
        """Upload the folder :meth:`save_pretrained` writes. The arguments are checked before the
        repo is created, so a bad call leaves nothing behind on the Hub."""
        # Overridden because the mixin creates the repo before it saves (where the arguments are
        # checked), and gives the card no repo id for its usage snippet.
        from huggingface_hub.utils import validate_repo_id

        _check_save_args(config, model_card_kwargs)
        try:
            validate_repo_id(repo_id)
        except Exception as err:
            raise UsageError(f"invalid repo id {repo_id!r}: {err}") from None
        card = {"repo_id": repo_id, **(model_card_kwargs or {})}
        return super().push_to_hub(repo_id, model_card_kwargs=card, **kwargs)

    def generate_model_card(
        self,
        *,
        provenance: Mapping[str, Any] | None = None,
        repo_id: str | None = None,
        license: str | None = None,
    ):
        """The model card :meth:`save_pretrained` writes, as a ``huggingface_hub.ModelCard``:
        :data:`MODEL_CARD_TEMPLATE` filled for this model; ``model_card_kwargs`` are these arguments."""
        # Overridden because the mixin renders the class header's metadata; this card carries the
        # model's own licence (its weights') and numbers, in the same template.
        from huggingface_hub import ModelCard

        return ModelCard.from_template(
            _card_data(self, license),
            template_str=self._hub_mixin_info.model_card_template,
            **_card_fields(self, provenance, repo_id),
        )


def _check_save_args(config: Any, model_card_kwargs: Mapping[str, Any] | None) -> None:
    if config is not None:
        raise UsageError(
            "config.json is derived from the model's architecture, so save_pretrained/push_to_hub take no "
            "config; put metadata in model_card_kwargs={'provenance': {...}}"
        )
    unknown = sorted(set(model_card_kwargs or {}) - set(_MODEL_CARD_KWARGS))
    if unknown:
        raise UsageError(
            f"unknown model_card_kwargs {', '.join(unknown)}; expected some of {', '.join(_MODEL_CARD_KWARGS)}"
        )
