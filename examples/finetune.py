"""Journey 2: fine-tune torchvision's ImageNet DenseNet on your own images, within a memory budget.

    python examples/finetune.py ~/flowers --memory 8GiB --batch-size 64 --out runs/flowers

``DATA`` is an ImageFolder (``DATA/<class>/*.jpg``, or ``DATA/train`` and ``DATA/val``). The
script picks the fastest memory mode whose training step fits ``--memory`` (the planner, which
simulates the step on fake tensors: ``de.estimate_memory`` / ``de.max_batch_size``), fine-tunes
from torchvision's weights, reports the validation accuracy, and reloads the saved Hugging Face folder two ways: ``de.from_pretrained``
and ``torch.hub.load(..., "from_pretrained", ...)``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

import densenet_efficient as de
from densenet_efficient.cli import run_script
from densenet_efficient.errors import UsageError
from densenet_efficient.models.hub import HUB_REPO
from densenet_efficient.training import TrainConfig, train

#: Fastest first: the first mode whose step fits the budget at the asked batch size wins.
MODES = ("naive", "efficient", "max_saving")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: data, budget, a short schedule, and where to save and reload from."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="an ImageFolder")
    parser.add_argument("--arch", default="densenet121", help="an ImageNet DenseNet (default densenet121)")
    parser.add_argument("--memory", default="8GiB", help="the training memory budget (default 8GiB)")
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224, help="image size in pixels (default 224)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", default="runs/finetuned", help="the run folder (its best/ is the HF folder)")
    parser.add_argument(
        "--repo", default=HUB_REPO, help="where torch.hub reloads from ('owner/name' or a checkout)"
    )
    parser.add_argument("--source", choices=("github", "local"), default="github")
    return parser.parse_args(argv)


def choose_mode(arch: str, memory: str, batch_size: int, image_size: int, device: str) -> str:
    """The fastest memory mode whose training step at ``batch_size`` fits ``memory``; prints the plan."""
    fits = {}
    for mode in MODES:
        try:
            fits[mode] = de.max_batch_size(arch, memory, image_size=image_size, mode=mode, device=device)
        except UsageError:  # not even one image fits in this mode
            fits[mode] = 0
        print(f"{mode:>10}: at most {fits[mode]} images per step in {memory}")
    chosen = next((m for m in MODES if fits[m] >= batch_size), None)
    if chosen is None:
        raise UsageError(
            f"a batch of {batch_size} {arch} images at {image_size}x{image_size} fits {memory} in no mode "
            f"(at most {max(fits.values())}); lower --batch-size or --image-size"
        )
    need = de.estimate_memory(arch, batch_size=batch_size, image_size=image_size, mode=chosen, device=device)
    print(f"chose {chosen!r}: a step of {batch_size} needs about {need.total / 2**30:.2f} GiB")
    return chosen


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Plan, fine-tune, report, reload; returns the accuracy, the chosen mode and both reloaded models."""
    args = parse_args(argv)
    if args.source == "github":  # fetched (or found cached) now: offline fails before training, not after
        torch.hub.list(args.repo, trust_repo=True)
    mode = choose_mode(args.arch, args.memory, args.batch_size, args.image_size, args.device)
    result = train(
        TrainConfig(
            arch=args.arch,
            pretrained=True,  # torchvision's ImageNet weights; the classifier is re-initialised for DATA
            data=args.data,
            image_size=args.image_size,
            mode=mode,
            n_epochs=args.epochs,
            batch_size=args.batch_size,
            device=args.device,
            save=args.out,
            progress=False,
        )
    )
    accuracy = 1 - result.best_valid_error
    print(f"validation accuracy {accuracy:.1%} (best of {result.epochs_completed} epochs)")

    folder = Path(args.out) / "best"  # model.safetensors + config.json + README.md, as save_pretrained writes
    ours = de.from_pretrained(folder, memory_efficient=mode)
    hub = torch.hub.load(args.repo, "from_pretrained", str(folder), source=args.source, trust_repo=True)
    print(f"reloaded {folder} with de.from_pretrained and torch.hub.load: {ours.num_classes} classes")
    return {"accuracy": accuracy, "mode": mode, "folder": folder, "from_pretrained": ours, "hub": hub}


if __name__ == "__main__":
    sys.exit(run_script("finetune.py", main))
