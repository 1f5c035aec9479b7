"""Reading a JSON object from a file users may have edited: every failure is one sentence.

``json.loads`` recurses once per nesting level, so a file nested 100,000 levels deep (a few
hundred kilobytes of ``[``) raises ``RecursionError``. That becomes a :class:`UsageError` naming
the file and the top-level field holding the nesting, found by a linear scan (no recursion).

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "config.json"
>>> _ = path.write_text('{"growth_rate": 32, "block_config": ' + "[" * 100_000 + "]" * 100_000 + "}")
>>> read_json_object(path, "my-folder")
Traceback (most recent call last):
...
densenet_efficient.errors.UsageError: my-folder: config.json's field 'block_config' is nested more than ... levels deep; expected a JSON object of plain fields
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from ..errors import UsageError, shown
from .files import require_regular_file

__all__ = ["deepest_field", "read_json_object"]

# a JSON string (escapes included) or a bracket: the only tokens nesting depends on
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def deepest_field(text: str) -> tuple[str | None, int]:
    """The top-level key whose value nests deepest in the JSON ``text``, and that depth (levels of
    ``[``/``{`` below the top-level object); ``None`` when no key was read before the nesting.
    One pass of a regular expression: O(len(text)), no recursion at any depth.

    >>> deepest_field('{"a": [1], "b": [[{"c": []}]]}')
    ('b', 4)
    """
    depth, key, best, best_key = 0, None, 0, None
    for match in _TOKENS.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth - 1 > best:
                best, best_key = depth - 1, key
        elif token in "]}":
            depth -= 1
        elif depth == 1 and text[match.end() :].lstrip()[:1] == ":":
            key = json.loads(token)  # a key of the top-level object (a flat string: no recursion)
    return best_key, best


def read_json_object(path: Path, source: str) -> dict[str, Any]:
    """The JSON object in ``path`` (a file named like ``config.json`` in ``source``, the folder or
    repo the user named).

    Raises:
        UsageError: the file is not UTF-8 JSON, nests deeper than Python's parser can follow
            (naming the top-level field that does), or holds something other than an object.
    """
    name = path.name
    require_regular_file(path, f"{source}: {name}")  # a FIFO would block the read forever
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{source}: {name} is not valid JSON ({e})") from None
    except RecursionError:
        key, _ = deepest_field(text)
        where = f"field {shown(key)}" if key is not None else "top-level value"
        raise UsageError(
            f"{source}: {name}'s {where} is nested more than {sys.getrecursionlimit()} levels deep; "
            "expected a JSON object of plain fields"
        ) from None
    if not isinstance(data, dict):
        raise UsageError(f"{source}: {name} must hold a JSON object, found {type(data).__name__}")
    return data
