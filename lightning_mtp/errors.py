"""The library's own exception for bad input (a leaf: every layer raises it).

:class:`UserInputError` is a ``ValueError`` (so ``except ValueError`` and ``pytest.raises(ValueError)`` keep
catching it) raised where input is checked at the boundary: an argument, a config value, a file, a name. The
``lightning-mtp`` command reports it in one line with exit code 2; any other ``ValueError`` is a bug, shown
with its traceback.
"""

from __future__ import annotations

__all__ = ["UserInputError"]


class UserInputError(ValueError):
    """Bad input, named with its value and what it must be: the user fixes it, not the library."""
