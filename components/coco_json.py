"""Streaming reader for large COCO annotation files.

``json.load`` of a COCO-sized file (hundreds of MB) builds every annotation as Python objects at once. This
reader walks the top-level object itself and decodes the elements of the big arrays (``images``,
``annotations``) one at a time with the C decoder (``JSONDecoder.raw_decode``) over a sliding text window,
so memory stays at one window plus what the caller keeps, while parsing runs at C speed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from components.errors import UserError

CHUNK_CHARS = 1 << 22
_WS = " \t\n\r"


class CocoJsonReader:
    """Iterate ``(key, value)`` over a JSON object file; values of ``stream_keys`` arrays are iterators.

    Each iterator must be consumed before asking for the next key.
    """

    def __init__(self, path: Path, stream_keys: frozenset[str] = frozenset({"images", "annotations"})):
        self.path = path
        self.stream_keys = stream_keys
        self._fh = open(path, encoding="utf-8")  # noqa: SIM115 - closed in close()/__exit__
        self._buf = ""
        self._pos = 0
        self._eof = False
        self._dropped_chars = 0
        self._dropped_lines = 0
        self._decoder = json.JSONDecoder()

    def __enter__(self) -> CocoJsonReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._fh.close()

    # ------------------------------------------------------------ buffer

    def _fill(self) -> bool:
        """Append one chunk (dropping what was consumed); False at end of file."""
        if self._eof:
            return False
        try:
            chunk = self._fh.read(CHUNK_CHARS)
        except UnicodeDecodeError as err:
            raise UserError(
                f"{self.path}: not UTF-8 text ({err.reason}); save the file as UTF-8 JSON"
            ) from None
        if not chunk:
            self._eof = True
            return False
        consumed = self._buf[: self._pos]
        self._dropped_chars += len(consumed)
        self._dropped_lines += consumed.count("\n")
        self._buf = self._buf[self._pos :] + chunk
        self._pos = 0
        return True

    def _peek(self) -> str:
        while True:
            buf, pos = self._buf, self._pos
            while pos < len(buf) and buf[pos] in _WS:
                pos += 1
            self._pos = pos
            if pos < len(buf):
                return buf[pos]
            if not self._fill():
                return ""

    def _where(self, pos: int | None = None) -> str:
        pos = self._pos if pos is None else pos
        line = self._dropped_lines + self._buf.count("\n", 0, pos) + 1
        col = pos - (self._buf.rfind("\n", 0, pos) + 1) + 1
        return f"line {line} column {col} (char {self._dropped_chars + pos})"

    def _fail(self, what: str, pos: int | None = None) -> UserError:
        return UserError(
            f"{self.path}: invalid JSON at {self._where(pos)}: {what}; fix or re-export the annotation file"
        )

    def _expect(self, char: str) -> None:
        got = self._peek()
        if got != char:
            raise self._fail(f"expected {char!r}, found {got!r}" if got else f"expected {char!r}, file ends")
        self._pos += 1

    def _value(self) -> Any:
        """Decode one JSON value at the cursor, reading more text until it is complete."""
        self._peek()
        while True:
            try:
                value, end = self._decoder.raw_decode(self._buf, self._pos)
            except json.JSONDecodeError as err:
                if self._fill():
                    continue
                raise self._fail(err.msg, err.pos) from None
            if end >= len(self._buf) and self._fill():
                continue  # a number could go on in the next chunk
            self._pos = end
            return value

    # ------------------------------------------------------------ structure

    def _array(self) -> Iterator[Any]:
        self._expect("[")
        if self._peek() == "]":
            self._pos += 1
            return
        while True:
            yield self._value()
            if self._closed("]", "in an array"):
                return

    def _closed(self, close: str, where: str) -> bool:
        """After a member: True at ``close`` (consumed), False at ``,`` (consumed), else a parse error."""
        nxt = self._peek()
        self._pos += 1
        if nxt not in (close, ","):
            raise self._fail(f"expected ',' or {close!r} {where}, found {nxt!r}", self._pos - 1)
        return nxt == close

    def items(self) -> Iterator[tuple[str, Any]]:
        first = self._peek()
        if first != "{":
            raise UserError(
                f"{self.path}: top level must be a JSON object with images/annotations/categories, "
                f"found {first!r}" + ("" if first else " (the file is empty)")
            )
        self._pos += 1
        if self._peek() == "}":
            self._pos += 1
            return
        while True:
            if self._peek() != '"':
                raise self._fail("expected a key string")
            key = self._value()
            self._expect(":")
            if key in self.stream_keys and self._peek() == "[":
                yield key, self._array()
            else:
                yield key, self._value()
            if self._closed("}", f"after the value of {key!r}"):
                break
        if self._peek():
            raise self._fail("extra data after the top-level object")
