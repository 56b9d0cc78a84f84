"""Memory sizes as people write them: 512MiB, 20GiB, 1.5GiB, 4096 (bytes), 8GB (decimal), 2G (binary)."""
from __future__ import annotations

import re
from decimal import Decimal

UNITS = {"": 1, "b": 1,
         "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
         "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
         "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
         "t": 1 << 40, "tib": 1 << 40, "tb": 10**12}
MAX_SIZE = (1 << 64) - 1
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)", re.I)


class SizeError(ValueError):
    pass


def parse_size(text: str) -> int:
    """Whole bytes, above zero (a fraction of a byte is dropped)."""
    m = _SIZE.fullmatch(text.strip())
    if not m or m.group(2).lower() not in UNITS:
        raise SizeError(f"{text!r} is not a size (like 512MiB, 20GiB, 1.5GiB, 8GB or 4096 bytes)")
    size = int(Decimal(m.group(1)) * UNITS[m.group(2).lower()])
    if size <= 0:
        raise SizeError(f"{text!r} is not above zero bytes")
    if size > MAX_SIZE:
        raise SizeError(f"{text!r} is more than 16 EiB")
    return size
