"""The README's usage example runs as written (the other blocks need a network or a CLI run)."""

import re

from .support import REPO

README = REPO / "README.md"


def _python_blocks(section: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end != -1 else None], re.S)


def test_use_example_runs_and_shows_what_it_says():
    block = _python_blocks("Use")[0]
    scope: dict = {}
    exec(compile(block, "README.md#use", "exec"), scope)
    assert sum(p.numel() for p in scope["model"].parameters()) == 769_162  # the comment's figure
    assert scope["logits"].shape == (8, 10)
    assert scope["feats"].shape == (1, 1024, 7, 7)  # the comment's shape
    assert scope["deep"].arch_config.block_config == (41, 41, 41)  # depth 250 = 6 * 41 + 4
    assert scope["imagenet"].classifier.out_features == 5
    assert scope["imagenet"].memory_efficient == "max_saving"
    assert scope["model"].memory_efficient == "efficient"
