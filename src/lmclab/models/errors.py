"""Exception type of the model zoo."""

from __future__ import annotations

__all__ = ["ModelError"]


class ModelError(ValueError):
    """Raised for an unknown model name, an unknown or invalid option, or a bad norm."""
