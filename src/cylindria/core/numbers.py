"""Whole numbers in requests: ASCII digits in canonical form, nothing else."""

from __future__ import annotations

import re

# No sign, no leading zeros, no other scripts' digits (int() takes '+1', '01', '１').
_CANONICAL = re.compile(r"(?:0|[1-9][0-9]{0,17})", re.ASCII)


def canonical_int(raw: str) -> int | None:
    """The number `raw` writes, or None unless it is written as `str(n)` would be for
    a whole number n >= 0 of at most 18 digits."""
    if not _CANONICAL.fullmatch(raw):
        return None
    return int(raw)
