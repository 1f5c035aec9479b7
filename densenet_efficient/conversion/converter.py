"""Convert any DenseNet checkpoint into a verified, Hugging Face Hub-ready folder.

Reads torchvision ``.pth`` files (old ``norm.1`` and current key styles, legacy and zip serialization),
timm checkpoints (``.pth`` or safetensors), efficient_densenet_pytorch checkpoints (``norm_final``,
CIFAR stem, ``module.`` prefixes) and training checkpoints that wrap the weights. The steps, one
module each: find the file (:mod:`.sources`), read it safely and infer the architecture from the
tensor shapes (:mod:`.infer`), write ``model.safetensors`` + ``config.json`` + a model card with
provenance atomically, and check that the folder, loaded back, computes what the source model
computes (:mod:`.verify`).

    >>> import densenet_efficient as de

        result = de.convert("densenet121-a639ec97.pth", "out/densenet121")
        result.config.growth_rate, result.max_abs_diff
        # (32, 0.0)
"""

from __future__ import annotations

import datetime as _dt
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..errors import UsageError
from ..io.atomic import scratch_folder, staged_folder
from ..io.checkpoint import Checkpoint, CheckpointError, read_checkpoint
from ..io.json_file import read_json_object
from ..io.state_dict import StateDictMismatchError
from ..models.config import ARCHITECTURES, ArchConfig, get_config
from ..models.densenet import DenseNet
from ..models.hub import CARD_NAME, CONFIG_NAME, model_card, save_hub_folder
from ..models.weights import list_weights
from .infer import ConversionError, check_against, infer_config, normalize_keys
from .sources import fetch_source, source_format, torchvision_loadable
from .verify import TOLERANCE, converted_model, max_abs_diff, reference_model

__all__ = ["ConvertResult", "convert", "convert_all_torchvision", "torchvision_architectures"]


@dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert` wrote and how it checked it.

    Attributes:
        out_dir: the folder written (``model.safetensors``, ``config.json``, ``README.md``).
        config: the architecture inferred from the tensors.
        arch: the architecture name the config matches (``"densenet121"``), or None for other shapes.
        source: the SRC given (path, URL or architecture name).
        source_file: name of the file read.
        sha256: sha256 of that file.
        source_format: container and key style in words.
        reference: the model the converted one was compared with, or None when not verified.
        max_abs_diff: max abs difference of the outputs (None when not verified).
        input_shape: the shape of the verification batch (None when not verified).
    """

    out_dir: Path
    config: ArchConfig
    arch: str | None
    source: str
    source_file: str
    sha256: str
    source_format: str
    reference: str | None
    max_abs_diff: float | None
    input_shape: tuple[int, ...] | None = None
    provenance: dict[str, Any] = field(default_factory=dict, compare=False)

    def summary(self) -> str:
        """Two human lines: what was converted to where, and the verification result."""
        name = self.arch or self.config.describe()
        check = (
            f"verified against {self.reference}: max abs diff {self.max_abs_diff:.3g} "
            f"on a {'x'.join(map(str, self.input_shape or ()))} batch (tolerance {TOLERANCE:g})"
            if self.max_abs_diff is not None
            else "verification skipped (--no-verify)"
        )
        return f"{self.source_file} ({self.source_format}) -> {self.out_dir} [{name}]\n  {check}"


@dataclass
class _Source:
    """A read checkpoint: the file, its tensors under torchvision's names and what they describe."""

    path: Path
    checkpoint: Checkpoint
    state_dict: dict[str, Any]
    config: ArchConfig
    format: str
    torchvision_file: bool
    pretrained_cfg: dict[str, Any]


def _read_source(
    src: str | os.PathLike, checkpoint_key: str | None, progress: bool, model_dir: str | None, out_dir: Path
) -> _Source:
    """Fetch ``src``, read it without unsafe unpickling, rename its keys and infer its architecture.

    A URL is downloaded into a scratch folder beside ``out_dir`` (:func:`..io.atomic.scratch_folder`):
    removed when done, and by the next conversion into ``out_dir`` if this one is killed."""
    with scratch_folder(out_dir) as downloads:
        path = fetch_source(src, downloads, progress, model_dir)
        try:
            ckpt = read_checkpoint(path, key=checkpoint_key)
        except CheckpointError as err:
            if not path.is_relative_to(downloads):
                raise
            # the downloaded copy is deleted when this returns: name what the user gave instead
            raise CheckpointError(str(err).replace(str(path), f"{os.fspath(src)} (as downloaded)")) from None
    sd, prefix = normalize_keys(ckpt.state_dict)
    config = infer_config(sd)
    # torchvision's own class (the independent reference) has 3 input channels and a classifier
    torchvision_file = torchvision_loadable(ckpt, prefix) and config.in_chans == 3 and config.num_classes > 0
    return _Source(
        path, ckpt, sd, config, source_format(ckpt, prefix), torchvision_file, _folder_pretrained_cfg(src)
    )


def _folder_pretrained_cfg(src: str | os.PathLike) -> dict[str, Any]:
    """A Hub folder's ``pretrained_cfg`` (timm's: preprocessing, licence...), kept by the conversion."""
    config = Path(src) / CONFIG_NAME
    if not config.exists():  # a FIFO or a folder there is refused by name when read
        return {}
    try:
        cfg = read_json_object(config, os.fspath(src)).get("pretrained_cfg")
    except UsageError as err:
        raise ConversionError(str(err)) from None
    return dict(cfg) if isinstance(cfg, dict) else {}


def _reference(source: _Source) -> tuple[nn.Module, str]:
    try:
        return reference_model(
            source.config, source.checkpoint.state_dict, source.state_dict, source.torchvision_file
        )
    except (RuntimeError, StateDictMismatchError) as err:
        raise ConversionError(
            f"verification failed: the source model cannot load the tensors ({err})"
        ) from None


def _provenance(source: _Source) -> dict[str, Any]:
    from .. import __version__

    return {
        "source_file": source.path.name,
        "source_sha256": source.checkpoint.sha256,
        "source_format": source.format,
        "converted_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "converted_with": f"densenet_efficient {__version__} (densenet-efficient convert)",
        "verification": "skipped (--no-verify)",
    }


def _verify_folder(
    folder: Path, model: DenseNet, reference: nn.Module, reference_name: str, provenance: dict[str, Any]
) -> tuple[float, tuple[int, ...]]:
    """Load ``folder`` exactly as users will, compare it with the source model and record the
    result in its model card; raise :class:`ConversionError` above :data:`TOLERANCE`."""
    loaded = DenseNet.from_pretrained(folder, memory_efficient=False)
    diff, shape = max_abs_diff(reference, loaded)
    if not math.isfinite(diff):  # the source's own numbers, not the conversion (nan - nan is nan)
        bad = next((k for k, v in model.state_dict().items() if v.is_floating_point() and not v.isfinite().all()), None)
        where = f"tensor {bad} holds NaN or infinite values" if bad else "outputs are not finite"
        raise ConversionError(
            f"verification cannot compare the models: the source checkpoint's {where}, so both models "
            "output NaN; fix the source, or pass --no-verify to convert it as it is"
        )
    if not diff <= TOLERANCE:
        raise ConversionError(
            f"verification failed: the converted model differs from {reference_name} by "
            f"{diff:.3g} (max abs, tolerance {TOLERANCE:g}); nothing was written"
        )
    provenance["verification"] = (
        f"max abs diff {diff:.3g} vs {reference_name} on a {'x'.join(map(str, shape))} "
        f"float32 random batch, eval mode (tolerance {TOLERANCE:g})"
    )
    provenance["max_abs_diff"] = diff
    (folder / CARD_NAME).write_text(model_card(model, provenance=provenance), encoding="utf-8")
    return diff, shape


def convert(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    verify: bool = True,
    checkpoint_key: str | None = None,
    progress: bool = True,
    model_dir: str | None = None,
) -> ConvertResult:
    """Convert a DenseNet checkpoint into a Hugging Face Hub-ready folder, verified by default.

    Args:
        src: a checkpoint file (torch ``.pth``/``.pth.tar`` or ``.safetensors``), a Hub repo folder
            holding ``model.safetensors`` or ``pytorch_model.bin`` (a timm snapshot), an http(s) URL
            (a torchvision-style ``name-<sha256 prefix>.pth`` is hash-checked) or an architecture name
            such as ``"densenet121"`` (torchvision's file, hash-checked).
        out_dir: the folder to create; it must not exist. Written in a temporary sibling and
            renamed into place, so an error leaves nothing behind.
        arch: expected named architecture; an error names each way the tensors disagree.
        num_classes: expected classifier width; an error if the tensors disagree.
        verify: compare source and converted models on one random batch (eval mode, float32) and
            fail above :data:`~.verify.TOLERANCE` max abs difference.
        checkpoint_key: where the weights sit in a training checkpoint (``"state_dict_ema"``);
            default: the first of :data:`~densenet_efficient.io.checkpoint.WRAPPER_KEYS` found.
        progress: show download progress bars.
        model_dir: download cache for architecture names (default: torch.hub's checkpoint dir).

    Returns:
        A :class:`ConvertResult` (``result.summary()`` prints well).

    Example::

            result = convert("runs/bc100/checkpoint.pth.tar", "hub/densenet-bc-100")
            from_pretrained("hub/densenet-bc-100")
    """
    out_dir = Path(out_dir)
    if arch is not None:
        get_config(arch)  # unknown name: fail before any work
    if os.path.lexists(out_dir):
        raise FileExistsError(f"output folder {out_dir} already exists; remove it or choose another OUT_DIR")
    source = _read_source(src, checkpoint_key, progress, model_dir, out_dir)
    check_against(source.config, arch, num_classes)
    model = converted_model(source.config, source.state_dict)
    model.pretrained_cfg = {**model.pretrained_cfg, **source.pretrained_cfg, "num_classes": model.num_classes}
    reference = _reference(source) if verify else None
    provenance = _provenance(source)
    diff = shape = None
    with staged_folder(out_dir) as folder:  # appears complete, or not at all
        save_hub_folder(model, folder, provenance=provenance, overwrite=True)
        if reference is not None:
            diff, shape = _verify_folder(folder, model, *reference, provenance)
    return ConvertResult(
        out_dir=out_dir,
        config=source.config,
        arch=source.config.architecture_name(ignore_classes=True),
        source=os.fspath(src),
        source_file=source.path.name,
        sha256=source.checkpoint.sha256,
        source_format=source.format,
        reference=reference[1] if reference is not None else None,
        max_abs_diff=diff,
        input_shape=shape,
        provenance=provenance,
    )


def torchvision_architectures() -> list[str]:
    """The ImageNet architectures whose published weights are torchvision's files."""
    return [a for a, c in ARCHITECTURES.items() if not c.small_inputs and list_weights(a)]


def convert_all_torchvision(
    out_root: str | os.PathLike, *, verify: bool = True, progress: bool = True, model_dir: str | None = None
) -> list[ConvertResult]:
    """Convert torchvision's four ImageNet DenseNet checkpoints to ``out_root/<arch>`` (hash-checked).

    Every target folder is checked before the first download, so an existing one stops the run
    before anything is written.
    """
    out_root = Path(out_root)
    archs = torchvision_architectures()
    existing = [str(out_root / a) for a in archs if os.path.lexists(out_root / a)]
    if existing:
        raise FileExistsError(
            f"output folders already exist: {', '.join(existing)}; remove them or choose another OUT_ROOT"
        )
    return [
        convert(a, out_root / a, arch=a, verify=verify, progress=progress, model_dir=model_dir) for a in archs
    ]
