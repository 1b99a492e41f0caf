"""What the tracker, the report and the plot share: the memory categories and how bytes are written."""

from __future__ import annotations

__all__ = ["CATEGORIES", "CATEGORY_CODE", "format_bytes"]

# Display order, which is also the precedence when one storage plays several roles over its life: a
# parameter saved for backward is a parameter, a gradient buffer created by a backward op is a gradient.
CATEGORIES: tuple[str, ...] = (
    "parameters",
    "buffers",
    "optimizer_state",
    "gradients",
    "inputs",
    "activations",
    "temporaries",
)
CATEGORY_CODE: dict[str, int] = {name: i for i, name in enumerate(CATEGORIES)}

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(n: int | float) -> str:
    """Formats a byte count in binary units: ``format_bytes(3 * 2**20) == '3.00 MiB'``."""
    value = float(n)
    sign = "-" if value < 0 else ""
    value = abs(value)
    unit = 0
    while value >= 1024.0 and unit < len(_UNITS) - 1:
        value /= 1024.0
        unit += 1
    if unit == 0:
        return f"{sign}{int(value)} B"
    return f"{sign}{value:.2f} {_UNITS[unit]}"
