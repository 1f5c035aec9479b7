"""Journey 3: torchvision's checkpoint in, a verified Hugging Face folder out, loaded by everyone; and back.

    python examples/convert_torchvision.py densenet121-a639ec97.pth out/densenet121
    python examples/convert_torchvision.py densenet121 out/densenet121          # torchvision's download
    python examples/convert_torchvision.py SRC out/densenet121 --run runs/flowers  # + a fine-tuned run

``de.convert`` reads the file (torchvision's 2017 ``norm.1`` keys, legacy serialization), infers
the architecture, verifies the converted model against the source and writes ``OUT/hf``. The
folder is then loaded by torchvision itself, by this package and by timm, and the largest
difference between their outputs is printed. With ``--run``, a training run of ours
(``densenet-efficient train ... --save RUN``) goes back into torchvision's layout:
``OUT/torchvision.pth`` loads with ``torchvision.models.DenseNet(...).load_state_dict``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file

import densenet_efficient as de
from densenet_efficient.cli import run_script
from densenet_efficient.errors import UsageError, require_extra


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: the source checkpoint, the output folder, and optionally one of our runs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="a torchvision checkpoint file, URL or architecture name")
    parser.add_argument("out", help="a new folder: OUT/hf, and with --run OUT/run and OUT/torchvision.pth")
    parser.add_argument("--run", help="a run folder of `densenet-efficient train --save RUN` to export")
    parser.add_argument(
        "--image-size", type=int, default=224, help="the comparison batch's size (default 224)"
    )
    return parser.parse_args(argv)


def torchvision_model(folder: Path) -> torchvision.models.DenseNet:
    """torchvision's own DenseNet for a converted folder's architecture, its safetensors loaded strictly."""
    cfg = de.from_pretrained(folder).arch_config
    if cfg.small_inputs or cfg.in_chans != 3:
        raise UsageError(
            f"{folder} holds a CIFAR-stem or {cfg.in_chans}-channel DenseNet, which torchvision cannot build"
        )
    model = torchvision.models.DenseNet(
        growth_rate=cfg.growth_rate,
        block_config=tuple(cfg.block_config),
        num_init_features=cfg.num_init_features,
        bn_size=cfg.bn_size,
        num_classes=cfg.num_classes,
    )
    model.load_state_dict(load_file(folder / "model.safetensors"))  # strict: every key, every shape
    return model.eval()


def max_abs_diff(a: torch.nn.Module, b: torch.nn.Module, image_size: int) -> float:
    """The largest output difference of two models on one random batch (eval mode)."""
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((a.eval()(x) - b.eval()(x)).abs().max())


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Convert, load three ways, optionally export a run; returns each printed difference by name."""
    args = parse_args(argv)
    require_extra("timm", "convert_torchvision.py (it loads the folder with timm too)")  # before converting
    import timm

    out = Path(args.out)
    result = de.convert(args.src, out / "hf")  # verified against the source; fails above 1e-5
    print(result.summary())

    tv = torchvision_model(out / "hf")
    ours = de.from_pretrained(out / "hf", memory_efficient=True)
    tm = timm.create_model(f"local-dir:{out / 'hf'}", pretrained=True)
    diffs = {
        "torchvision vs ours": max_abs_diff(tv, ours, args.image_size),
        "torchvision vs timm": max_abs_diff(tv, tm, args.image_size),
    }

    if args.run:  # a fine-tuned run of ours, back into torchvision's layout
        run = Path(args.run)
        de.convert(run / "checkpoint.pt", out / "run")
        exported = torchvision_model(out / "run")
        torch.save(exported.state_dict(), out / "torchvision.pth")
        diffs["run: torchvision vs ours"] = max_abs_diff(
            exported, de.from_pretrained(run / "last"), args.image_size
        )
        print(f"wrote {out / 'torchvision.pth'}: torchvision.models.DenseNet(...).load_state_dict reads it")

    for name, diff in diffs.items():
        print(f"max abs difference, {name}: {diff:.2e}")
    return diffs


if __name__ == "__main__":
    sys.exit(run_script("convert_torchvision.py", main))
