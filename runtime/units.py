"""Parsing of human-written quantities on command lines."""
from __future__ import annotations

import re


def parse_size(text: str) -> int:
    """'4GB', '512MiB', '1.5G', '1073741824' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 4GB, 512MB, 1073741824)")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))
