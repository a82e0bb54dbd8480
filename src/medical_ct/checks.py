"""What the parameter checks share (each group is checked once, into a typed object)."""

from typing import Any


def is_number(value: Any) -> bool:
    """An int or float, not a bool: ``float(True)`` is 1.0, and YAML's ``true`` is no number."""
    return isinstance(value, int | float) and not isinstance(value, bool)
