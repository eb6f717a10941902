"""The one error type of recipe problems."""

from __future__ import annotations

__all__ = ["RecipeError"]


class RecipeError(ValueError):
    """A recipe or command-line override that does not fit the schema; the message is one line naming the key."""
