"""Strict JSON: duplicate object keys and non-standard numbers are errors.

Python's `json` keeps the last of two equal keys and accepts NaN/Infinity. Two parsers
that disagree on which duplicate wins are a classic token-smuggling vector, so tokens,
JWKS documents and other security inputs are parsed with `loads_strict`.
"""

from __future__ import annotations

import json
from typing import Any


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key[:64]!r}")
        result[key] = value
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"non-standard number {name}")


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constants)


def loads_strict(data: bytes | str) -> Any:
    """Parse JSON; raise ValueError on duplicate keys, NaN/Infinity, bad UTF-8 or nesting
    deep enough to exhaust the parser's recursion."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    try:
        return _DECODER.decode(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
