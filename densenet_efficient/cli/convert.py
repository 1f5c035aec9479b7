"""``densenet-efficient convert``: any DenseNet checkpoint -> a verified Hugging Face Hub folder.

densenet-efficient convert densenet121 out/densenet121          # torchvision's file, hash-checked
densenet-efficient convert ckpt.pth.tar out/bc100 --checkpoint-key state_dict_ema
densenet-efficient convert --all-torchvision out/
"""

from __future__ import annotations

import argparse

from ..conversion import convert, convert_all_torchvision
from ..models.config import ARCHITECTURES
from . import CLIError

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``densenet-efficient convert``."""
    parser.description = (
        "Convert a DenseNet checkpoint (torchvision, timm, efficient_densenet_pytorch or a training "
        "checkpoint; .pth or .safetensors; file, URL or architecture name) into a verified Hugging Face "
        "Hub-ready folder (model.safetensors, config.json, model card)."
    )
    parser.add_argument(
        "src",
        nargs="?",
        metavar="SRC",
        help="checkpoint file, http(s) URL or architecture name (densenet121)",
    )
    parser.add_argument("out_dir", nargs="?", metavar="OUT_DIR", help="folder to create (must not exist)")
    parser.add_argument(
        "--arch", choices=sorted(ARCHITECTURES), help="expected architecture; error if the tensors disagree"
    )
    parser.add_argument(
        "--num-classes", type=int, help="expected classifier width; error if the tensors disagree"
    )
    parser.add_argument(
        "--checkpoint-key",
        metavar="KEY",
        help="where the weights are in a training checkpoint, e.g. state_dict_ema or model/module",
    )
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip comparing outputs of source and converted model",
    )
    parser.add_argument(
        "--all-torchvision",
        metavar="OUT_ROOT",
        help="convert torchvision's four ImageNet checkpoints into OUT_ROOT/<arch>",
    )
    parser.add_argument("--model-dir", help="download cache (default: torch.hub's checkpoints folder)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``densenet-efficient convert``; user errors raise and exit with code 2."""
    progress = not args.quiet
    try:
        if args.all_torchvision is not None:
            if (
                args.src is not None
                or args.out_dir is not None
                or args.arch
                or args.num_classes
                or args.checkpoint_key
            ):
                raise CLIError(
                    "--all-torchvision OUT_ROOT takes no SRC/OUT_DIR/--arch/--num-classes/--checkpoint-key"
                )
            results = convert_all_torchvision(
                args.all_torchvision, verify=args.verify, progress=progress, model_dir=args.model_dir
            )
        else:
            if args.src is None or args.out_dir is None:
                raise CLIError("expected SRC and OUT_DIR (or --all-torchvision OUT_ROOT)")
            results = [
                convert(
                    args.src,
                    args.out_dir,
                    arch=args.arch,
                    num_classes=args.num_classes,
                    verify=args.verify,
                    checkpoint_key=args.checkpoint_key,
                    progress=progress,
                    model_dir=args.model_dir,
                )
            ]
    except OSError as err:  # an unreachable server or an unreadable disk: the input's fault, not a bug
        raise CLIError(str(err)) from None
    for result in results:
        print(result.summary())
    return 0
