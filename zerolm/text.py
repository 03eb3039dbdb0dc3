"""Text checks shared by the data readers and the server."""

from __future__ import annotations


def lone_surrogate(text: str) -> int | None:
    """Index of the first lone surrogate in `text`, or None. JSON's "\\ud800" escape
    decodes to one; such a string is not Unicode text: no tokenizer can encode it and
    it cannot be written as UTF-8."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as exc:
        return exc.start
