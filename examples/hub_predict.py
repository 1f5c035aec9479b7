"""Journey 1: load a DenseNet through torch.hub and name what an image shows.

    python examples/hub_predict.py cat.jpg                                  # this project on GitHub
    python examples/hub_predict.py cat.jpg --repo . --source local          # a checkout
    python examples/hub_predict.py cat.jpg --pretrained                     # pretrained=True
    python examples/hub_predict.py cat.jpg --weights none                   # random weights

The image is prepared with the weights' own ``transforms()`` (resize 256, crop 224, ImageNet
mean/std for densenet121) and the prediction named with the weights' ``categories``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from PIL import Image

import densenet_efficient as de
from densenet_efficient.cli import run_script
from densenet_efficient.models.hub import HUB_REPO


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: the image, where the hub repository is, and which weights to load."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", help="the image to classify (any format PIL reads)")
    parser.add_argument(
        "--repo", default=HUB_REPO, help=f"GitHub 'owner/name[:tag]' or a checkout (default {HUB_REPO})"
    )
    parser.add_argument("--source", choices=("github", "local"), default="github")
    parser.add_argument("--arch", default="densenet121", help="the entrypoint (default densenet121)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights", default="DEFAULT", help="weights name, or 'none' for random weights")
    weights.add_argument("--pretrained", action="store_true", help="pretrained=True (the DEFAULT weights)")
    parser.add_argument("--top", type=int, default=3, help="how many classes to print (default 3)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Load, preprocess, predict; prints the top classes and returns the best one."""
    args = parse_args(argv)
    if args.pretrained:
        kwargs: dict[str, Any] = {"pretrained": True}
        name = "DEFAULT"
    elif args.weights.lower() == "none":
        kwargs, name = {}, None
    else:
        kwargs, name = {"weights": args.weights}, args.weights
    model = torch.hub.load(args.repo, args.arch, source=args.source, trust_repo=True, **kwargs).eval()

    # The weights carry their preprocessing and class names; random weights still need the former.
    weights = de.get_weights(args.arch, name or "DEFAULT")
    batch = weights.transforms()(Image.open(args.image).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        probs = model(batch).softmax(dim=1)[0]
    categories = weights.meta["categories"] if name else None
    top = probs.topk(min(args.top, probs.numel()))
    for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True):
        print(f"{p:7.2%}  {categories[i] if categories else f'class {i}'}")
    index = int(top.indices[0])
    return {
        "index": index,
        "category": categories[index] if categories else None,
        "probability": float(top.values[0]),
        "model": model,
    }


if __name__ == "__main__":
    sys.exit(run_script("hub_predict.py", main))
