"""The mixin the DenseNet class inherits: huggingface_hub's ``PyTorchModelHubMixin`` with this
package's folder format in its hooks, plus :func:`save_hub_folder` and :func:`load_hub_folder`.

The mixin's own ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` do the work and take
their usual arguments; this package fills the hooks huggingface_hub defines for it
(``_save_pretrained``, ``_from_pretrained``, ``generate_model_card``, the class header's card
metadata and template) and wraps the three public methods only to check what the mixin would act
on unchecked, each saying why. This module knows models only through what every DenseNet offers
(``arch_config``, ``state_dict``, ``pretrained_cfg``, the class itself): it imports nothing from
:mod:`..densenet`.

    model.save_pretrained("out/bc100")
    DenseNet.from_pretrained("out/bc100", memory_efficient=True)
    save_hub_folder(model, "out/bc100", provenance={"trained": "train"}, overwrite=True)
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from huggingface_hub import PyTorchModelHubMixin

from ...errors import UsageError
from .card import HUB_REPO, LIBRARY_NAME, MODEL_CARD_TEMPLATE, PACKAGE_LICENSE, check_card_kwargs, render_card
from .config_json import folder_kwargs
from .files import DOWNLOAD_OPTIONS, locate, read_config
from .folder import load_files, model_folder, write_model_files

__all__ = ["DenseNetHubMixin", "load_hub_folder", "save_hub_folder"]

#: ``from_pretrained`` arguments that are not the architecture's: how to run and load it.
_LOAD_CHOICES = ("memory_efficient", "num_classes", "map_location", "strict")
#: ``from_pretrained`` arguments about fetching, the mixin's ("resume_download": accepted, unused).
_FETCH_OPTIONS = (*DOWNLOAD_OPTIONS, "resume_download")


class DenseNetHubMixin(
    PyTorchModelHubMixin,
    library_name=LIBRARY_NAME,
    tags=["image-classification", "densenet", "memory-efficient", "torchvision-compatible"],
    license=PACKAGE_LICENSE,
    repo_url=f"https://github.com/{HUB_REPO}",
    paper_url="https://arxiv.org/abs/1707.06990",
    pipeline_tag="image-classification",
    model_card_template=MODEL_CARD_TEMPLATE,
):
    """huggingface_hub's ``PyTorchModelHubMixin`` with this package's folder format in its hooks.

    ``from_pretrained`` takes the mixin's arguments (``revision``, ``cache_dir``,
    ``force_download``, ``proxies``, ``resume_download``, ``token``, ``local_files_only``,
    ``map_location``, ``strict``) plus ``memory_efficient`` and ``num_classes``, and reads this
    package's folders and timm's DenseNet repos; loading is strict unless ``strict=False``.
    ``save_pretrained`` writes ``model.safetensors``, ``config.json`` and the model card through
    :func:`.folder.model_folder`: atomically, replacing this package's files and nothing else.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """Load a Hub repo or local folder (ours, or timm's DenseNet repos); see :func:`load_hub_folder`.

        model = DenseNet.from_pretrained("org/densenet121", memory_efficient=True)
        """
        # Wrapped because the mixin reads config.json unchecked (bad JSON, a list, a FIFO would be
        # its own errors or a hang), and fills the constructor's arguments from it where the caller
        # gave none, so the caller's choices are checked here, before it runs. A repo id's files
        # are fetched once, here, with one-sentence errors; the mixin then reads the folder found
        # (a repo's snapshot in the Hugging Face cache) and calls `_from_pretrained` on it.
        name = os.fspath(pretrained_model_name_or_path)
        _check_load_arguments(cls, kwargs, name)
        files = locate(name, {k: kwargs[k] for k in DOWNLOAD_OPTIONS if kwargs.get(k) is not None})
        folder_kwargs(read_config(files.config, name), name)  # every field checked, naming `name`
        return super().from_pretrained(files.folder, **kwargs)

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
        num_classes: int | None = None,
        **fields_of_config: Any,
    ):
        # `config` is config.json as the mixin read it, and `fields_of_config` the constructor
        # arguments the mixin copied from it (growth_rate, block_config, ...; the caller's own
        # were refused by from_pretrained). The architecture is read from `config` itself, which
        # timm's format needs anyway; `num_classes` is the caller's or the file's own.
        opts = dict(revision=revision, cache_dir=cache_dir, force_download=force_download, token=token,
                    local_files_only=local_files_only, proxies=proxies)  # fmt: skip
        # from_pretrained hands a local folder: found at once, nothing fetched
        files = locate(model_id, {k: v for k, v in opts.items() if v is not None})
        kwargs, pretrained_cfg = folder_kwargs(
            config if config is not None else read_config(files.config, files.source), files.source
        )
        return load_files(
            files,
            kwargs,
            pretrained_cfg,
            model_cls=cls,
            memory_efficient=memory_efficient,
            num_classes=None if num_classes == kwargs["num_classes"] else num_classes,
            strict=strict,
            map_location=map_location,
        )

    def _save_pretrained(self, save_directory: Path) -> None:
        write_model_files(self, Path(save_directory))

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        config: Any = None,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        model_card_kwargs: dict[str, Any] | None = None,
        overwrite: bool = True,
        **push_to_hub_kwargs: Any,
    ) -> str | None:
        """The mixin's ``save_pretrained``, after checking its arguments (nothing is written otherwise),
        into :func:`.folder.model_folder`'s staging folder.

        ``config.json`` is derived from the architecture, so ``config`` is refused;
        ``model_card_kwargs`` may hold ``provenance`` (a dict), ``repo_id`` and ``license``.
        A new ``save_directory`` appears complete or not at all; in an existing one this package's
        files are replaced, each atomically, and nothing else is touched (a model card someone
        else wrote stays). ``overwrite=False`` refuses an existing non-empty folder instead.
        """
        # Wrapped because the mixin creates the folder and deletes its config.json before
        # `_save_pretrained` runs, so a kill or a full disk in between left a folder that no longer
        # loads: the mixin writes into a staging folder instead, moved into place when complete.
        _check_save_args(config, model_card_kwargs)
        with model_folder(save_directory, overwrite=overwrite) as staging:
            super().save_pretrained(staging, model_card_kwargs=model_card_kwargs)
        if push_to_hub:  # as the mixin's own save_pretrained does, once the folder is complete
            return self.push_to_hub(
                repo_id=repo_id or Path(save_directory).name,
                model_card_kwargs=model_card_kwargs,
                **push_to_hub_kwargs,
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
        # Wrapped because the mixin creates the repo before it saves (where the arguments are
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
        """The model card :meth:`save_pretrained` writes, as a ``huggingface_hub.ModelCard``;
        ``model_card_kwargs`` are these arguments (:func:`.card.render_card`)."""
        # The mixin's hook renders the class header's metadata; this card carries the model's own
        # licence (its weights') and numbers, in the same template.
        return render_card(self, provenance=provenance, repo_id=repo_id, license=license)


def _check_load_arguments(cls: type, kwargs: Mapping[str, Any], source: str) -> None:
    """Refuse what ``from_pretrained`` cannot honour: constructor arguments other than
    :data:`_LOAD_CHOICES` (the architecture is the saved one), and names it does not know (the
    mixin would hand them on to ``_from_pretrained`` beside the ones it copies from config.json)."""
    accepts = f"it accepts {', '.join(_LOAD_CHOICES)} and the Hub download options"
    init = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    chosen = {k: v for k, v in kwargs.items() if k in init and k not in _LOAD_CHOICES}
    if chosen:
        raise UsageError(
            f"{source}: from_pretrained cannot change the saved architecture "
            f"({', '.join(f'{k}={v!r}' for k, v in chosen.items())}); {accepts}"
        )
    unknown = sorted(set(kwargs) - {*init, *_LOAD_CHOICES, *_FETCH_OPTIONS})
    if unknown:
        raise UsageError(f"{source}: from_pretrained has no argument {', '.join(unknown)}; {accepts}")


def _check_save_args(config: Any, model_card_kwargs: Mapping[str, Any] | None) -> None:
    if config is not None:
        raise UsageError(
            "config.json is derived from the model's architecture, so save_pretrained/push_to_hub take no "
            "config; put metadata in model_card_kwargs={'provenance': {...}}"
        )
    check_card_kwargs(model_card_kwargs)


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

    ``model.save_pretrained(out_dir, overwrite=overwrite, model_card_kwargs=...)``: the one way a
    model folder is written (:func:`.folder.model_folder`). A new ``out_dir`` appears complete or
    not at all; an existing non-empty one raises :class:`FileExistsError` unless ``overwrite=True``,
    and then this package's files are replaced, each atomically, and nothing else there is touched.
    ``provenance`` (e.g. source file, sha256, date, verification result) becomes a section of the
    model card; ``repo_id`` is used in its usage snippet. Returns the folder.

        save_hub_folder(model, "hub/densenet121", provenance={"source": "densenet121-a639ec97.pth"})
    """
    if not isinstance(model, DenseNetHubMixin):
        raise TypeError(f"save_hub_folder expects a densenet_efficient.DenseNet, got {type(model).__name__}")
    card = {"provenance": provenance, "repo_id": repo_id, "license": license}
    model.save_pretrained(out_dir, overwrite=overwrite, model_card_kwargs=card)
    return Path(out_dir)


def load_hub_folder(
    repo_id_or_path: str | os.PathLike,
    *,
    model_cls: type[DenseNetHubMixin],
    memory_efficient: bool | str = False,
    num_classes: int | None = None,
    strict: bool = True,
    map_location: str | torch.device = "cpu",
    **opts: Any,
) -> nn.Module:
    """``model_cls.from_pretrained(...)``: build it from a Hub repo id or a local folder, loaded, in eval mode.

    Reads folders written by ``save_pretrained`` / :func:`save_hub_folder` and timm's DenseNet repos.
    The weights must fit ``config.json`` exactly (a mismatch raises
    :class:`~densenet_efficient.io.state_dict.StateDictMismatchError` naming the keys and, for the
    classifier, both class counts). An explicit ``num_classes`` different from the folder's loads
    everything but the classifier and warns (fine-tuning). ``strict=False`` loads what fits and
    leaves the rest initialised, as ``nn.Module.load_state_dict(strict=False)``. ``opts``:
    ``revision``, ``cache_dir``, ``force_download``, ``token``, ``local_files_only``, ``proxies``.

        model = load_hub_folder("timm/densenet121.tv_in1k", model_cls=DenseNet, memory_efficient=True)
    """
    return model_cls.from_pretrained(
        repo_id_or_path,
        memory_efficient=memory_efficient,
        num_classes=num_classes,
        strict=strict,
        map_location=map_location,
        **opts,
    )
