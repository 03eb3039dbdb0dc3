"""Which text encoding a file is in (`read.encoding`), chosen once per file.

The setting is "utf-8" (the default), "auto", or a list of codec names tried in
order, e.g. [utf-8, gb18030, cp1252]. The first that decodes the file's head sample
strictly is the file's encoding; if none does, the first in the list is used and the
records that do not decode are rejected one by one. "auto" is [utf-8, gb18030,
cp1252]: UTF-8 is tried first because a text that decodes as UTF-8 almost never is
anything else, while cp1252 decodes nearly any byte string and so comes last.

A byte-order mark always wins, whatever the setting: UTF-8's is dropped, and UTF-16
and UTF-32 files (whose BOM makes their encoding certain) are text. Those two are not
ASCII-compatible (a newline is not the byte 0x0A), so they are transcoded to UTF-8 as
they are read; ids and offsets of their records then count bytes of that UTF-8 text.
Every other encoding is decoded record by record from the file's own bytes, so ids,
offsets and byte-range splits stay those of the file.

The choice is made from the head of the FILE (not of a chunk), so every read task of a
split file agrees.
"""

from __future__ import annotations

import codecs
from typing import Union

EncodingSetting = Union[str, list[str]]
AUTO = ["utf-8", "gb18030", "cp1252"]
SAMPLE = 256 << 10  # head bytes the choice is made from
BOMS = [  # longest first: UTF-32-LE's BOM starts with UTF-16-LE's
    (codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"),
]


def canonical(name: str) -> str:
    """The codec's canonical name; a clear error for an unknown one (config time)."""
    try:
        return codecs.lookup(name).name
    except LookupError:
        raise ValueError(f"unknown text encoding {name!r} (use a Python codec name such as utf-8, gb18030, "
                         f"cp1252, or 'auto')") from None


def candidates(setting: EncodingSetting) -> list[str]:
    names = AUTO if setting == "auto" else [setting] if isinstance(setting, str) else setting
    if not names:
        raise ValueError("read.encoding: give 'auto', one codec name or a non-empty list")
    return [canonical(n) for n in names]


def bom_of(head: bytes) -> tuple[str, int] | None:
    """(encoding, BOM length) if the bytes open with a byte-order mark."""
    for bom, name in BOMS:
        if head.startswith(bom):
            return name, len(bom)
    return None


def ascii_compatible(encoding: str) -> bool:
    """Whether records can be split on the byte b"\\n" and decoded one by one."""
    try:
        return "\n a{".encode(encoding) == b"\n a{"
    except (UnicodeError, LookupError):
        return False


def choose(head: bytes, setting: EncodingSetting, whole_file: bool) -> tuple[str, int]:
    """(encoding, bytes to skip at the file's start) for a file whose first bytes are
    `head`. `whole_file`: head is the entire file (else its end may cut a character)."""
    bom = bom_of(head)
    if bom is not None:
        return bom
    names = candidates(setting)
    for name in names:
        decoder = codecs.getincrementaldecoder(name)(errors="strict")
        try:
            decoder.decode(head, final=whole_file)
            return name, 0
        except UnicodeDecodeError:
            continue
    return names[0], 0


def _mark_undecodable(exc: UnicodeDecodeError):
    # A lone surrogate, which UTF-8 (surrogatepass) writes as bytes that are not valid
    # UTF-8: the record holding it is rejected downstream instead of silently altered.
    return "\ud800", exc.end


codecs.register_error("zerolm-mark", _mark_undecodable)


class Transcoder:
    """A stream of UTF-8 bytes read from a stream in a non-ASCII-compatible encoding
    (UTF-16/32). Bytes that do not decode become invalid UTF-8, so their record is
    rejected (invalid_utf8) and the rest of the file is kept."""

    def __init__(self, stream, encoding: str, skip: int):
        self.stream = stream
        self.decoder = codecs.getincrementaldecoder(encoding)(errors="zerolm-mark")
        self.pending = bytearray()
        self.eof = False
        if skip:
            stream.read(skip)

    def read(self, n: int = -1) -> bytes:
        while not self.eof and (n < 0 or len(self.pending) < n):
            raw = self.stream.read(1 << 20)
            text = self.decoder.decode(raw, final=not raw)
            self.pending += text.encode("utf-8", errors="surrogatepass")
            self.eof = not raw
        take = len(self.pending) if n < 0 else min(n, len(self.pending))
        out = bytes(self.pending[:take])
        del self.pending[:take]
        return out

    def seek(self, pos: int) -> None:  # only a whole-file read from the start is transcoded
        if pos:
            raise ValueError("a transcoded stream is read from its start only")

    def close(self) -> None:
        self.stream.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
