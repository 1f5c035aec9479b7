"""The DenseNet's Hugging Face Hub support: its folder format and the mixin its class inherits.

A folder (or Hub repo) holds ``model.safetensors`` (torchvision's key layout), ``config.json``
(the architecture only: how dense blocks execute, ``memory_efficient``, is a load-time choice)
and ``README.md``, a model card with Hub metadata and a usage snippet. Folders of timm's
DenseNets (``timm/densenet121.tv_in1k``) load too: their modules have torchvision's names.

The model class inherits :class:`DenseNetHubMixin`, so this module knows models only through
what every DenseNet offers (``arch_config``, ``state_dict``, the class itself): it imports
nothing from :mod:`.densenet`.

>>> import densenet_efficient as de
>>> model = de.densenet_bc_100()
>>> de.save_hub_folder(model, "out/bc100", provenance={"trained": "densenet-efficient train"})  # doctest: +SKIP
>>> de.from_pretrained("out/bc100", memory_efficient=True)                                     # doctest: +SKIP
>>> de.from_pretrained("timm/densenet121.tv_in1k")       # timm's repos load too             # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from huggingface_hub import PyTorchModelHubMixin

from ..errors import UsageError
from ..io.atomic import staged_folder
from ..io.checkpoint import read_checkpoint
from ..io.state_dict import StateDictMismatchError, load_state_dict_into
from .config import ARCHITECTURES, get_config

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "DenseNetHubMixin",
    "hub_config",
    "load_hub_folder",
    "model_card",
    "save_hub_folder",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PICKLE_WEIGHTS_NAME = "pytorch_model.bin"  # older timm repos; loaded with weights_only=True
CARD_NAME = "README.md"

_ARCH_KEYS = ("growth_rate", "block_config", "num_init_features", "bn_size", "num_classes", "small_inputs")


# -- writing -----------------------------------------------------------------------------------------


def hub_config(model: nn.Module) -> dict[str, Any]:
    """``config.json`` for ``model``: its architecture (``"architecture"`` names the architecture, as
    timm does) and ``drop_rate``; never ``memory_efficient``, which is chosen when loading."""
    cfg = model.arch_config
    return {
        "architecture": cfg.architecture_name(ignore_classes=True) or "densenet",
        **cfg.to_json(),
        "drop_rate": model.drop_rate,
    }


def model_card(
    model: nn.Module,
    *,
    provenance: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
    license: str | None = None,
) -> str:
    """The README.md of a Hub folder: YAML metadata, a summary, a usage snippet and (optionally) provenance."""
    from huggingface_hub import ModelCardData

    base = type(model)._hub_mixin_info  # the metadata given in DenseNet's class header
    data = ModelCardData(**base.model_card_data.to_dict())
    if license:
        data.license = license
    cfg = model.arch_config
    arch = cfg.architecture_name(ignore_classes=True)
    title = arch or f"DenseNet (k={cfg.growth_rate}, blocks={tuple(cfg.block_config)})"
    size = cfg.default_resolution
    where = repo_id or "<repo id or local folder>"
    params = sum(p.numel() for p in model.parameters())
    lines = [
        "---",
        data.to_yaml().strip(),
        "---",
        "",
        f"# {title}",
        "",
        f"{cfg.describe()}: {params:,} parameters, {cfg.num_classes} classes. A memory-efficient DenseNet "
        f"from [densenet_efficient]({base.repo_url}) with torchvision's exact `state_dict` layout.",
        "",
        "## Usage",
        "",
        "```python",
        "import torch",
        "import densenet_efficient as de",
        "",
        f'model = de.from_pretrained("{where}", memory_efficient=True).eval()',
        "with torch.no_grad():",
        f"    logits = model(torch.randn(1, 3, {size}, {size}))",
        "```",
        "",
        '`memory_efficient` (`False`/"naive", `True`/"efficient", "max_saving") is chosen at load time: it '
        "changes training memory and speed, never the weights.",
        "",
        "## Model details",
        "",
        "| field | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | `{json.dumps(v)}` |" for k, v in hub_config(model).items()]
    lines += [
        f"| parameters | {params:,} |",
        f"| minimum input size | {cfg.min_input_size()}x{cfg.min_input_size()} |",
    ]
    if provenance:
        lines += ["", "## Provenance", ""]
        for key, value in provenance.items():
            shown = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
            lines.append(f"- **{key}**: {shown}")
    return "\n".join(lines) + "\n"


def save_hub_folder(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    provenance: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    repo_id: str | None = None,
    license: str | None = None,
) -> Path:
    """Write ``model.safetensors`` + ``config.json`` + ``README.md`` into ``out_dir`` atomically.

    The files are staged in a temporary folder beside ``out_dir``: a new ``out_dir`` appears
    complete or not at all. An existing non-empty ``out_dir`` raises :class:`FileExistsError`
    unless ``overwrite=True``; then each of the three files is replaced atomically and nothing
    else in the folder is touched. ``provenance`` (e.g. source file, sha256, date, verification
    result) becomes a section of the model card; ``repo_id`` is used in its usage snippet.
    Returns the folder.

    >>> save_hub_folder(model, "hub/densenet121", provenance={"source": "densenet121-a639ec97.pth"})  # doctest: +SKIP
    """
    from safetensors.torch import save

    if not isinstance(model, DenseNetHubMixin):
        raise TypeError(f"save_hub_folder expects a densenet_efficient.DenseNet, got {type(model).__name__}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; expected a folder path for the Hub files")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pass overwrite=True to replace it")
    with staged_folder(out, replace=True) as tmp:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        # Bytes, then a plain write: safetensors' own file writer reports a full disk as a
        # SafetensorError, a plain write as the OSError (ENOSPC) callers can recognise.
        (tmp / WEIGHTS_NAME).write_bytes(save(tensors, metadata={"format": "pt"}))
        (tmp / CONFIG_NAME).write_text(json.dumps(hub_config(model), indent=2) + "\n", encoding="utf-8")
        card = model_card(model, provenance=provenance, repo_id=repo_id, license=license)
        (tmp / CARD_NAME).write_text(card, encoding="utf-8")
    return out


# -- reading -----------------------------------------------------------------------------------------


def _model_kwargs(config: Mapping[str, Any], source: str) -> dict[str, Any]:
    """DenseNet constructor arguments from our config.json or timm's."""
    if not isinstance(config, Mapping):
        raise UsageError(f"{source}: config.json must hold a JSON object, found {type(config).__name__}")
    if all(k in config for k in _ARCH_KEYS):
        kwargs = {k: config[k] for k in _ARCH_KEYS}
        kwargs["block_config"] = tuple(kwargs["block_config"])
        kwargs["drop_rate"] = float(config.get("drop_rate", 0.0))
        return kwargs
    arch = config.get("architecture")
    if arch is None:
        raise UsageError(
            f"{source}: config.json has neither DenseNet fields ({', '.join(_ARCH_KEYS)}) nor an 'architecture'; "
            "expected a folder written by save_pretrained/save_hub_folder or a timm DenseNet repo"
        )
    return _timm_kwargs(config, str(arch), source)


def _timm_kwargs(config: Mapping[str, Any], arch: str, source: str) -> dict[str, Any]:
    """timm's DenseNets (densenet121/161/169/201) have torchvision's module names and computation:
    BatchNormAct2d is a BatchNorm2d with the ReLU fused in, so its state_dict keys are the same."""
    if arch not in ARCHITECTURES or ARCHITECTURES[arch].small_inputs:
        supported = ", ".join(n for n, c in ARCHITECTURES.items() if not c.small_inputs)
        raise UsageError(
            f"{source}: timm architecture {arch!r} is not supported; expected one of {supported}"
        )
    model_args = dict(config.get("model_args") or {})
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
    kwargs["num_classes"] = int(config.get("num_classes", pretrained_cfg.get("num_classes", 1000)))
    kwargs["drop_rate"] = float(model_args.get("proj_drop_rate", 0.0))  # timm's per-layer dropout
    return kwargs


def _offline_reason(local_files_only: bool) -> str:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1 forbids downloading it"
    if local_files_only:
        return "local_files_only=True forbids downloading it"
    return "the Hugging Face Hub could not be reached"


def _hub_file(repo_id: str, filename: str, opts: dict[str, Any]) -> str:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from .. import __version__

    try:
        return hf_hub_download(
            repo_id, filename, library_name="densenet_efficient", library_version=__version__, **opts
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        cache = opts.get("cache_dir") or constants.HF_HUB_CACHE
        raise FileNotFoundError(
            f"cannot load {repo_id!r}: its {filename} is not in the Hugging Face cache ({cache}) and "
            f"{_offline_reason(bool(opts.get('local_files_only')))}"
        ) from None
    except HFValidationError:
        raise FileNotFoundError(
            f"{repo_id!r} is neither an existing local folder nor a valid Hugging Face repo id (org/name)"
        ) from None
    except RevisionNotFoundError:
        raise UsageError(f"repo {repo_id!r} has no revision {opts.get('revision')!r}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"no Hugging Face repo {repo_id!r} (or it is private or gated: log in with `hf auth login`)"
        ) from None


def _locate(name_or_path: str, opts: dict[str, Any]) -> tuple[Path, Path]:
    """(config.json, weights file) of a local folder or a Hub repo (downloaded or from the cache)."""
    from huggingface_hub.errors import RemoteEntryNotFoundError

    local = Path(name_or_path)
    if local.is_dir():
        config = local / CONFIG_NAME
        if not config.is_file():
            raise FileNotFoundError(
                f"{local} has no {CONFIG_NAME}; expected a folder written by save_pretrained/save_hub_folder "
                f"({CONFIG_NAME} + {WEIGHTS_NAME}) or a copy of a timm DenseNet repo"
            )
        for name in (WEIGHTS_NAME, PICKLE_WEIGHTS_NAME):
            if (local / name).is_file():
                return config, local / name
        raise FileNotFoundError(f"{local} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    if local.exists():
        raise FileNotFoundError(f"{local} is a file; expected a folder or a Hugging Face repo id")
    config = Path(_hub_file(name_or_path, CONFIG_NAME, opts))
    try:
        return config, Path(_hub_file(name_or_path, WEIGHTS_NAME, opts))
    except RemoteEntryNotFoundError:  # older timm repos ship only the pickle
        return config, Path(_hub_file(name_or_path, PICKLE_WEIGHTS_NAME, opts))


def load_hub_folder(
    repo_id_or_path: str | os.PathLike,
    *,
    memory_efficient: bool | str = False,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    token: str | bool | None = None,
    local_files_only: bool = False,
    map_location: str | torch.device = "cpu",
    num_classes: int | None = None,
    model_cls: type[nn.Module],
) -> nn.Module:
    """Build ``model_cls`` from a Hub repo id or a local folder and load it strictly, in eval mode.

    Reads folders written by :func:`save_hub_folder` / ``DenseNet.save_pretrained`` and timm's DenseNet
    repos (``timm/densenet121.tv_in1k``, ...). Weights must fit the architecture in ``config.json``
    exactly (a mismatch raises :class:`~densenet_efficient.StateDictMismatchError` naming the keys),
    except that ``num_classes`` different from the repo's loads everything but the classifier and
    warns (fine-tuning). With ``HF_HUB_OFFLINE=1`` a cached repo loads from the cache.

    >>> model = load_hub_folder("timm/densenet121.tv_in1k", model_cls=de.DenseNet)   # doctest: +SKIP
    """
    source = os.fspath(repo_id_or_path)
    opts = {
        "revision": revision,
        "cache_dir": cache_dir,
        "force_download": force_download,
        "token": token,
        "local_files_only": local_files_only,
    }
    config_path, weights_path = _locate(source, opts)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UsageError(f"{source}: config.json is not valid JSON ({e})") from None
    kwargs = _model_kwargs(config, source)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = model_cls(**kwargs, memory_efficient=memory_efficient)
    state_dict = read_checkpoint(weights_path).state_dict
    try:
        load_state_dict_into(model, state_dict, source=source)
    except StateDictMismatchError as e:
        raise StateDictMismatchError(
            f"{source}: {weights_path.name} does not match its {CONFIG_NAME}: {e}"
        ) from None
    return model.to(map_location).eval()


class DenseNetHubMixin(
    PyTorchModelHubMixin,
    library_name="densenet_efficient",
    tags=["image-classification", "densenet", "memory-efficient", "torchvision-compatible"],
    license="mit",
    repo_url="https://github.com/gpleiss/efficient_densenet_pytorch",
    paper_url="https://arxiv.org/abs/1707.06990",
    pipeline_tag="image-classification",
):
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for DenseNets, in the folder
    format above (huggingface_hub's ``PyTorchModelHubMixin`` with this package's files)."""

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        memory_efficient: bool | str = False,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        **kwargs: Any,
    ):
        """Load a Hub repo or local folder (ours, or timm's DenseNet repos) strictly; see :func:`load_hub_folder`.

        >>> model = DenseNet.from_pretrained("org/densenet121", memory_efficient=True)  # doctest: +SKIP
        """
        return load_hub_folder(
            pretrained_model_name_or_path,
            memory_efficient=memory_efficient,
            revision=revision,
            cache_dir=cache_dir,
            model_cls=cls,
            **kwargs,
        )

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        config: Any = None,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        model_card_kwargs: dict[str, Any] | None = None,
        overwrite: bool = False,
        **push_to_hub_kwargs: Any,
    ) -> str | None:
        """Write ``model.safetensors`` + ``config.json`` + a model card atomically (see :func:`save_hub_folder`).

        ``model_card_kwargs`` may hold ``provenance`` (a dict), ``repo_id`` and ``license``.
        """
        if config is not None:
            raise UsageError(
                "config.json is derived from the model's architecture; save_pretrained takes no config"
            )
        card = dict(model_card_kwargs or {})
        save_hub_folder(self, save_directory, overwrite=overwrite, **card)
        if push_to_hub:
            repo_id = repo_id or os.path.basename(os.path.abspath(save_directory))
            return self.push_to_hub(repo_id, model_card_kwargs=card, **push_to_hub_kwargs)
        return None

    def push_to_hub(
        self, repo_id: str, *, model_card_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> str:
        """Upload the folder :meth:`save_pretrained` writes; the model card's usage snippet names ``repo_id``."""
        card = {"repo_id": repo_id, **(model_card_kwargs or {})}
        return super().push_to_hub(repo_id, model_card_kwargs=card, **kwargs)

    def generate_model_card(self, *args: Any, **kwargs: Any):
        """The model card :meth:`save_pretrained` writes, as a ``huggingface_hub.ModelCard``."""
        from huggingface_hub import ModelCard

        return ModelCard(model_card(self, **kwargs))
