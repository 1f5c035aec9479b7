"""A model folder's files: written the one way every writer uses, and read back strictly.

Writing (:func:`model_folder`, which ``save_pretrained`` and ``save_hub_folder`` both go through):
the files are staged in a temporary folder beside the destination, so a new folder appears complete
or not at all and, in an existing one, each of this package's files (``model.safetensors``,
``config.json``, a model card this package wrote) is replaced atomically: a reader finds the old
or the new file, never none, and a kill or a full disk half-way leaves the folder as it was. Every
other file there stays, a ``README.md`` someone else wrote included.

Reading (:func:`load_files`): the weights must fit ``config.json`` exactly before the model is
built; another class count re-initialises the classifier (fine-tuning) and warns.

    with model_folder("out/bc100", overwrite=True) as staging:
        write_model_files(model, staging)
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ...io.atomic import atomic_write, staged_folder
from ...io.checkpoint import read_checkpoint
from ...io.state_dict import StateDictMismatchError, load_state_dict_into
from ..config import ArchConfig
from .card import CARD_NAME, is_package_card
from .config_json import hub_config
from .files import CONFIG_NAME, WEIGHTS_NAME, HubFiles

__all__ = ["load_files", "model_folder", "write_model_files"]


@contextlib.contextmanager
def model_folder(out: str | os.PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Yield an empty staging folder; what is written there lands in ``out`` as described above.

    An existing non-empty ``out`` is refused (:class:`FileExistsError`) unless ``overwrite``; a
    ``README.md`` in ``out`` that this package did not write is kept, whatever was staged.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; expected a folder path for the Hub files")
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out} already exists and is not empty; pass overwrite=True to replace it")
    card = out / CARD_NAME
    keep_card = os.path.lexists(card) and not is_package_card(card)
    with staged_folder(out, replace=True) as staging:
        yield staging
        if keep_card:  # a person's card (or another library's) is theirs: never replaced
            (staging / CARD_NAME).unlink(missing_ok=True)


def write_model_files(model: nn.Module, folder: Path) -> None:
    """``model.safetensors`` then ``config.json`` into ``folder``, each atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
    atomic_write(folder / CONFIG_NAME, (json.dumps(hub_config(model), indent=2) + "\n").encode())


def load_files(
    files: HubFiles,
    kwargs: dict[str, Any],
    pretrained_cfg: Mapping[str, Any],
    *,
    model_cls: type[nn.Module],
    memory_efficient: bool | str,
    num_classes: int | None,
    strict: bool,
    map_location: str | torch.device,
) -> nn.Module:
    """``model_cls`` built from ``kwargs`` (``config.json``'s, checked) with ``files.weights``
    loaded, in eval mode on ``map_location``; ``num_classes`` other than the file's gets a new head."""
    state_dict = read_checkpoint(files.weights).state_dict
    _check_classes(state_dict, kwargs["num_classes"], files)
    try:  # before building: a config asking for gigabytes is refused against a small file at once
        ArchConfig(**{k: v for k, v in kwargs.items() if k != "drop_rate"}).check_shapes(state_dict)
    except StateDictMismatchError as err:
        raise _does_not_match(files, err) from None
    if num_classes is not None:
        kwargs = {**kwargs, "num_classes": num_classes}
    model = model_cls(**kwargs, memory_efficient=memory_efficient)
    model.pretrained_cfg = {**model.pretrained_cfg, **pretrained_cfg, "num_classes": model.num_classes}
    try:
        if strict:
            load_state_dict_into(model, state_dict, source=files.source)
        else:
            model.load_state_dict(state_dict, strict=False)
    except StateDictMismatchError as err:
        raise _does_not_match(files, err) from None
    return model.to(map_location).eval()


def _check_classes(state_dict: Mapping[str, Any], num_classes: int, files: HubFiles) -> None:
    """A config.json whose class count contradicts its weights is an error, never a silent new head."""
    head = state_dict.get("classifier.weight")
    found = 0 if head is None else int(head.shape[0])
    if found != num_classes:
        raise StateDictMismatchError(
            f"{files.source}: {CONFIG_NAME} says num_classes={num_classes} but {files.weights.name} holds a "
            f"classifier with {found} outputs; fix the folder, or pass num_classes= to re-initialise the head"
        )


def _does_not_match(files: HubFiles, err: StateDictMismatchError) -> StateDictMismatchError:
    return StateDictMismatchError(
        f"{files.source}: {files.weights.name} does not match its {CONFIG_NAME}: {err}"
    )
