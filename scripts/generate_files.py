#!/usr/bin/env python
"""Rewrite the files that derive from the model table (``densenet_efficient/models/config.py``,
``MODEL_TABLE``), or check that they are current.

    python scripts/generate_files.py            # rewrite what is stale, print each file written
    python scripts/generate_files.py --check    # exit 1 naming the stale files; write nothing

Generated: ``weights/manifest.json`` (whole), and in ``hubconf.py``, ``README.md`` and
``weights/README.md`` the text between their ``begin generated: <part>`` and ``end generated:
<part>`` markers (torch.hub's entrypoints, the model tables). ``tests/test_generated.py`` fails
while any of them differs from what this script would write. Run from a checkout (it imports the
package beside it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the checkout's package, not an installed copy
    sys.path.insert(0, str(REPO))

from densenet_efficient.io.atomic import atomic_write  # noqa: E402
from densenet_efficient.models.config import MODEL_TABLE, ArchConfig, ModelEntry, num_params  # noqa: E402
from densenet_efficient.models.weights import manifest_json  # noqa: E402

__all__ = ["generated_files", "main"]

TRAIN_HINT = "none published yet: train with `densenet-efficient train`"


def _shape(config: ArchConfig) -> str:
    """``k=32, blocks 6-12-24-16, 64 init features``, as the builders' docstrings say it."""
    blocks = "-".join(str(n) for n in config.block_config)
    return f"k={config.growth_rate}, blocks {blocks}, {config.num_init_features} init features"


def _input(config: ArchConfig) -> str:
    size = config.default_resolution
    return f"{size}x{size} inputs, {config.num_classes} classes"


def _default_accuracy(row: ModelEntry) -> str | None:
    """``ImageNet-1K acc@1 74.434`` for the row's default weights; None without weights."""
    if row.default_weights is None:
        return None
    meta = row.weights[row.default_weights].meta
    return f"{meta['dataset']} acc@1 {meta['acc@1']}"


def hub_entrypoints() -> str:
    """hubconf.py's entrypoint for every row: torch.hub lists them without importing the package,
    so they are written out rather than made at import."""
    parts = []
    for arch, row in MODEL_TABLE.items():
        config = row.config
        accuracy = _default_accuracy(row)
        if accuracy:
            weights = f"{accuracy} with pretrained=True ({row.default_weights})."
            example = f'torch.hub.load(repo, "{arch}", pretrained=True, memory_efficient=True)'
        else:
            weights = (
                "No pretrained weights are published: pretrained=True raises and says how to train them."
            )
            example = f'torch.hub.load(repo, "{arch}", memory_efficient=True)'
        parts.append(
            f"def {arch}(pretrained: bool = False, progress: bool = True, **kwargs):\n"
            f'    """{row.title} ({_shape(config)}, {num_params(config):,} parameters;\n'
            f"    {_input(config)}). {weights}\n\n"
            f"    Example::\n\n"
            f"        model = {example}\n"
            f'    """\n'
            f'    return _registered("{arch}", pretrained, progress, kwargs)\n'
        )
    return "\n\n".join(parts) + "\n\n"  # two blank lines before the end marker, as between functions


def readme_models() -> str:
    """README.md's table of the named models."""
    lines = [
        "| model | architecture | parameters | input | pretrained weights |",
        "|---|---|---|---|---|",
    ]
    for arch, row in MODEL_TABLE.items():
        accuracy = _default_accuracy(row)
        weights = f"`{row.default_weights}`, {accuracy}" if accuracy else TRAIN_HINT
        config = row.config
        lines.append(
            f"| `{arch}` | {row.title}: {_shape(config)} | {num_params(config):,} | {_input(config)} | {weights} |"
        )
    return "\n".join(lines) + "\n"


def weights_table() -> str:
    """weights/README.md's table of the published files."""
    lines = [
        "| architecture | weights | file | sha256 prefix | acc@1 | acc@5 | parameters | GFLOPS | size (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arch, row in MODEL_TABLE.items():
        if not row.weights:
            lines.append(f"| {arch} | {TRAIN_HINT} | | | | | {num_params(row.config):,} | | |")
        for name in row.weights:
            m = row.manifest_entry(name)
            file = m["url"].rsplit("/", 1)[1]
            prefix = file.rsplit("-", 1)[1].split(".")[0]
            lines.append(
                f"| {arch} | {name} | [{file}]({m['url']}) | {prefix} | {m['acc@1']} | {m['acc@5']} | "
                f"{m['num_params']:,} | {m['GFLOPS']} | {m['file_size']} |"
            )
    return "\n".join(lines) + "\n"


#: file -> (comment opening a marker line, comment closing it, part -> its generated text)
_PARTS: dict[str, tuple[str, str, dict[str, Callable[[], str]]]] = {
    "hubconf.py": ("# --- ", " ---", {"entrypoints": hub_entrypoints}),
    "README.md": ("<!-- ", " -->", {"models": readme_models}),
    "weights/README.md": ("<!-- ", " -->", {"weights": weights_table}),
}


def _replace_part(text: str, file: str, part: str, body: str, opening: str, closing: str) -> str:
    begin = f"{opening}begin generated: {part} (scripts/generate_files.py, from MODEL_TABLE){closing}\n"
    end = f"{opening}end generated: {part}{closing}\n"
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise SystemExit(
            f"{file}: expected the marker lines {begin.strip()!r} and {end.strip()!r}, found none"
        )
    return text[: start + len(begin)] + body + text[stop:]


def generated_files(repo: Path = REPO) -> dict[Path, str]:
    """Every generated file and the text it should hold now."""
    files = {repo / "weights" / "manifest.json": manifest_json()}
    for file, (opening, closing, parts) in _PARTS.items():
        text = (repo / file).read_text(encoding="utf-8")
        for part, render in parts.items():
            text = _replace_part(text, file, part, render(), opening, closing)
        files[repo / file] = text
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 naming stale files; write nothing")
    args = parser.parse_args(argv)
    stale = {p: text for p, text in generated_files(REPO).items() if p.read_text(encoding="utf-8") != text}
    for path, text in stale.items():
        if not args.check:
            atomic_write(path, text.encode("utf-8"))
        print(f"{'stale' if args.check else 'wrote'} {path.relative_to(REPO)}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
