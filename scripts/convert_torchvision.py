#!/usr/bin/env python
"""Convert torchvision's ImageNet DenseNet checkpoints into verified Hugging Face Hub folders.

Maintainer script, a thin wrapper over ``densenet-efficient convert``: each file is downloaded
from the weights manifest with its sha256 checked, checked to be the architecture it is published
as, converted, verified against torchvision's own model, and written to ``OUT_ROOT/<arch>``.

    python scripts/convert_torchvision.py hub/                 # all four: hub/densenet121, ...
    python scripts/convert_torchvision.py hub/ densenet161     # just one

It imports the installed package: run it from a checkout after
``pip install -e .`` (or with ``PYTHONPATH=.``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from densenet_efficient import cli
from densenet_efficient.conversion import torchvision_architectures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "out_root", metavar="OUT_ROOT", help="folder that receives one sub-folder per architecture"
    )
    parser.add_argument(
        "archs", nargs="*", metavar="ARCH", help="architectures to convert (default: all four)"
    )
    parser.add_argument("--model-dir", help="download cache (default: torch.hub's checkpoints folder)")
    parser.add_argument("--no-verify", action="store_true", help="skip the output comparison")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    known = torchvision_architectures()
    unknown = [a for a in args.archs if a not in known]
    if unknown:
        parser.error(f"unknown architecture(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    extra = [
        *(["--model-dir", args.model_dir] if args.model_dir else []),
        *(["--no-verify"] if args.no_verify else []),
    ]
    extra += ["--quiet"] if args.quiet else []
    if not args.archs:
        return cli.main(["convert", "--all-torchvision", args.out_root, *extra])
    for arch in args.archs:
        code = cli.main(["convert", arch, str(Path(args.out_root) / arch), "--arch", arch, *extra])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
