"""Strict JSON for the files a user hands irank (JSON Lines manifests, Label Studio exports, sidecars).

Python's `json` accepts NaN and Infinity, keeps the last of two equal keys, turns a 5,000-digit number
into a ValueError without a position and a deeply nested document into a RecursionError. Here each
of those is a `JsonError` that says where it is (line and column), so a caller can name the file in
one line.
"""

from __future__ import annotations

import json
import math
import re

MAX_NUMBER_DIGITS = 1000  # a longer integer is refused (Python's own limit, 4300, raises without a position)


class JsonError(ValueError):
    """Text that is not the JSON irank reads: `message`, at 1-based `line` and `column` (0: unknown)."""

    def __init__(self, message: str, line: int = 0, column: int = 0):
        super().__init__(message)
        self.message, self.line, self.column = message, line, column

    def where(self) -> str:
        return f"line {self.line}, column {self.column}" if self.line else "somewhere"


class _Problem(ValueError):
    """Raised from the decoder's hooks; `token` is text to look for to say where."""

    def __init__(self, message: str, token: str, occurrence: int = 1):
        super().__init__(message)
        self.message, self.token, self.occurrence = message, token, occurrence


def _object(pairs: list) -> dict:
    made = dict(pairs)
    if len(made) != len(pairs):
        seen = set()
        key = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise _Problem(f"the key {key!r} appears twice in one object", json.dumps(key, ensure_ascii=False), 2)
    return made


def _constant(name: str):
    raise _Problem(f"{name} is not a JSON number", name)


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > MAX_NUMBER_DIGITS:
        raise _Problem(f"a number of {len(text.lstrip('-'))} digits (at most {MAX_NUMBER_DIGITS} are read)", text[:40])
    return int(text)


def _float(text: str) -> float:
    if len(text) > MAX_NUMBER_DIGITS:
        raise _Problem(f"a number of {len(text)} characters (at most {MAX_NUMBER_DIGITS} are read)", text[:40])
    value = float(text)
    if not math.isfinite(value):
        raise _Problem(f"the number {text[:40]} is too large for a float", text[:40])
    return value


_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_constant=_constant, parse_int=_integer,
                            parse_float=_float)
# For JSON irank writes itself (a sidecar, review.json, checkpoint metadata): Python's json writes a NaN or an
# infinite float (a diverged loss in a training history) as NaN or Infinity, so those are read back.
_LENIENT = json.JSONDecoder(object_pairs_hook=_object, parse_int=_integer, parse_float=_float)
_SURROGATE = re.compile(r"(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
                        r"|\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})")


def _position(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _deepest(text: str) -> tuple[int, int]:
    """The deepest nesting of lists and objects outside strings, and where it is first reached (looked for only
    once Python's decoder gave up: a loop over every character)."""
    depth, deepest, at, in_string, escaped = 0, 0, 0, False, False
    for offset, char in enumerate(text):
        if in_string:
            escaped, in_string = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > deepest:
                deepest, at = depth, offset
        elif char in "]}":
            depth -= 1
    return deepest, at


def parse(text: str, *, allow_nan: bool = False):
    """The value `text` holds, or JsonError naming the place; `allow_nan`: read NaN, Infinity and -Infinity (as
    Python's json writes them) instead of refusing them."""
    try:
        value = (_LENIENT if allow_nan else _DECODER).decode(text)
    except json.JSONDecodeError as exc:
        raise JsonError(exc.msg, exc.lineno, exc.colno) from None
    except _Problem as exc:
        at = -1
        for _ in range(exc.occurrence):
            at = text.find(exc.token, at + 1)
            if at < 0:
                break
        raise JsonError(exc.message, *(_position(text, at) if at >= 0 else (0, 0))) from None
    except RecursionError:
        deepest, at = _deepest(text)
        raise JsonError(f"lists and objects nested {deepest} levels deep, too deep to read", *_position(text, at)) from None
    if "\\u" in text and _SURROGATE.search(text):
        raise JsonError("a lone UTF-16 surrogate escape, which is no character", *_position(text, _SURROGATE.search(text).start()))
    return value


def kind(value) -> str:
    """What a JSON value is, in words, for messages."""
    for python, name in ((dict, "an object"), (list, "a list"), (str, "a string"), (bool, "true or false"),
                         ((int, float), "a number"), (type(None), "null")):
        if isinstance(value, python):
            return name
    return type(value).__name__
