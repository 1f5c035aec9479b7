"""The one exception every layer shares: :class:`UsageError`, a bad input or setting.

It subclasses :class:`ValueError` (so ``except ValueError`` keeps working) and lets the command
line tell a user's mistake (one sentence, exit code 2) from a bug (a traceback): the CLI catches
``UsageError`` and the package's other typed errors, never a bare ``ValueError``.
"""

__all__ = ["UsageError"]


class UsageError(ValueError):
    """An input, option or file that cannot work, explained in one sentence naming what was
    expected and what was found."""
