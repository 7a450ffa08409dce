"""Strict JSON for request bodies: what the standard library's `json` lets through, refused with a field path.

Python's `json` accepts NaN/Infinity, turns 1e400 into inf, keeps the last of duplicate keys, raises
ValueError on integers beyond 4,300 digits, RecursionError on deep nesting, and passes NUL and lone
surrogates that PostgreSQL (text and jsonb) then refuses with a 500. Every one of those is a 400 here.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

# Far below Python's 4,300-digit int limit and above any real quantity (a float has 17 significant digits).
MAX_NUMBER_CHARS = 100
# Nesting of arrays and objects in a whole body; `config` has its own, smaller cap (app.api.schemas).
MAX_BODY_DEPTH = 64

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(r"[^\[\]{}]+")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class JsonRejected(ValueError):
    """A body that is not strict JSON; `path` names the offending field ("config.a.0"), "" for the body."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.path = path


def text_problem(value: str) -> str | None:
    """Why a string cannot be stored or passed to a process: NUL, or a UTF-16 half that is not text."""
    if "\x00" in value:
        return "must not contain NUL characters"
    if _LONE_SURROGATE.search(value):
        return "must be valid Unicode (no unpaired surrogates)"
    return None


def nesting_depth(text: str) -> int:
    """The deepest nesting of arrays and objects, found without recursing (strings are skipped)."""
    brackets = _BRACKETS.sub("", _STRING.sub("", text))
    depth = deepest = 0
    for char in brackets:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _parse_int(literal: str) -> int:
    if len(literal) > MAX_NUMBER_CHARS:
        raise JsonRejected(f"number has more than {MAX_NUMBER_CHARS} characters")
    return int(literal)


def _parse_float(literal: str) -> float:
    if len(literal) > MAX_NUMBER_CHARS:
        raise JsonRejected(f"number has more than {MAX_NUMBER_CHARS} characters")
    value = float(literal)
    if not math.isfinite(value):
        raise JsonRejected("number is out of range")
    return value


def _parse_constant(name: str) -> Any:
    raise JsonRejected(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise JsonRejected(f"duplicate key {key!r}")
        result[key] = value
    return result


def _check_strings(value: Any, path: list[str]) -> None:
    # Iterative: the depth is already capped, but a wide body must not cost a frame per item either.
    stack: list[tuple[Any, list[str]]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            problem = text_problem(item)
            if problem:
                raise JsonRejected(f"string {problem}", ".".join(where))
        elif isinstance(item, dict):
            for key, child in item.items():
                problem = text_problem(key)
                if problem:
                    raise JsonRejected(f"key {problem}", ".".join(where))
                stack.append((child, [*where, key]))
        elif isinstance(item, list):
            stack.extend((child, [*where, str(i)]) for i, child in enumerate(item))


def loads(data: bytes | str, max_depth: int = MAX_BODY_DEPTH) -> Any:
    """Parse a request body as strict JSON (RFC 8259, UTF-8) or raise JsonRejected."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JsonRejected(f"body is not valid UTF-8 (byte {exc.start})") from None
    else:
        text = data
    if text.startswith("\ufeff"):
        raise JsonRejected("body must not start with a byte order mark")
    if nesting_depth(text) > max_depth:
        raise JsonRejected(f"body nests arrays and objects deeper than {max_depth} levels")
    try:
        value = json.loads(
            text,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
            object_pairs_hook=_unique_keys,
        )
    except JsonRejected:
        raise
    except RecursionError:  # pragma: no cover - nesting_depth refuses what could recurse this far
        raise JsonRejected("body nests too deeply") from None
    except ValueError as exc:
        raise JsonRejected(f"body is not valid JSON: {exc}") from None
    _check_strings(value, [])
    return value
