"""Kubernetes resource quantities ("500m", "2", "8Gi", "1.5G") parsed into canonical integers."""
from __future__ import annotations

import functools
import re
from decimal import Decimal, InvalidOperation

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "P": Decimal(10**15),
    "E": Decimal(10**18),
}
_QUANTITY = re.compile(r"^(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?P<suffix>[KMGTPE]i|[numkMGTPE]?)$")


def parse_quantity(value: str) -> Decimal:
    """The quantity's value in base units; raises ValueError for anything Kubernetes would refuse."""
    match = _QUANTITY.match(str(value).strip())
    if not match:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (examples: '2', '500m', '8Gi')")
    try:
        number = Decimal(match["number"])
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
        raise ValueError(f"{value!r} is not a number") from exc
    suffix = match["suffix"]
    return number * (_BINARY[suffix] if suffix in _BINARY else _DECIMAL[suffix])


# A batch of 1,000 jobs repeats a handful of quantities (and each is read twice, by its field and by the
# request): each distinct short string is parsed once. Pure functions; a refusal (ValueError) is not cached.
_CACHED_QUANTITY_LENGTH = 64


def cpu_to_millis(value: str) -> int:
    if isinstance(value, str) and len(value) <= _CACHED_QUANTITY_LENGTH:
        return _cpu_to_millis_cached(value)
    return _cpu_to_millis(value)


def memory_to_bytes(value: str) -> int:
    if isinstance(value, str) and len(value) <= _CACHED_QUANTITY_LENGTH:
        return _memory_to_bytes_cached(value)
    return _memory_to_bytes(value)


def _cpu_to_millis(value: str) -> int:
    millis = parse_quantity(value) * 1000
    if millis != millis.to_integral_value():
        raise ValueError(f"cpu {value!r} is finer than a millicore")
    return int(millis)


def _memory_to_bytes(value: str) -> int:
    amount = parse_quantity(value)
    if amount != amount.to_integral_value():
        raise ValueError(f"memory {value!r} is not a whole number of bytes")
    return int(amount)


_cpu_to_millis_cached = functools.lru_cache(maxsize=1024)(_cpu_to_millis)
_memory_to_bytes_cached = functools.lru_cache(maxsize=1024)(_memory_to_bytes)


def format_millis(millis: int) -> str:
    """CPU for people: whole cores (`16`), cores with up to three decimals (`15.89`), or millicores below one
    core (`250m`). Exact, so a figure read off the API can be sent back as a request."""
    if millis % 1000 == 0:
        return str(millis // 1000)
    if millis < 1000:
        return f"{millis}m"
    return f"{millis / 1000:.3f}".rstrip("0")


_BINARY_DESCENDING = ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki")


def format_bytes(amount: int) -> str:
    """Memory for people, in the largest binary unit it reaches: exact where it is a whole number of that
    unit (`8Gi`), else rounded to one decimal (`125.9Gi`, not `132015936Ki` as a kubelet reports it)."""
    if amount < 1024:
        return str(amount)
    for index, suffix in enumerate(_BINARY_DESCENDING):
        unit = _BINARY[suffix]
        if amount < unit:
            continue
        if amount % unit == 0:
            return f"{amount // unit}{suffix}"
        rounded = round(amount / unit, 1)
        if rounded >= 1024 and index > 0:  # 1023.96Gi reads better as 1.0Ti than as 1024.0Gi
            larger = _BINARY_DESCENDING[index - 1]
            return f"{amount / _BINARY[larger]:.1f}{larger}"
        return f"{rounded:.1f}{suffix}"
    return str(amount)  # pragma: no cover - amounts of 1024 and more reach Ki
