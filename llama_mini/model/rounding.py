"""Whole-number rounding, written once: ceiling division and rounding up to a multiple.

Exact at any size: integer arithmetic, where math.ceil(a / b) would go through a float and could be off by
one for numbers beyond 2^53.
"""

from __future__ import annotations

__all__ = ["ceil_div", "round_up"]


def ceil_div(n: int, d: int) -> int:
    """ceil(n / d) for integers, d > 0: -(-n // d), since Python's // rounds toward minus infinity."""
    return -(-n // d)


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n."""
    return multiple * ceil_div(n, multiple)
