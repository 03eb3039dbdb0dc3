"""Compressed inputs read so that damage loses only what is damaged.

pyarrow's compressed streams decompress in large blocks and raise on a truncated or
corrupt file, so everything decompressed in the failing block is lost with it (up to
megabytes of complete records). Here gzip and bz2 are decompressed incrementally from
small compressed reads with the stdlib's decompressors: every byte that decompresses
is delivered, and only then does the stream raise `DamagedStream` saying where the
damage is. A truncated file so keeps every complete record before the cut.
Multi-member gzip (as `cat a.gz b.gz` makes) and multi-stream bz2 are read whole;
zero padding after the last gzip member (tape/block tools add it) is ignored.
Other codecs (zstd, lz4) keep pyarrow's stream: damage there loses the block.
"""

from __future__ import annotations

import bz2
import zlib

import pyarrow as pa

COMPRESSED_READ = 64 << 10  # compressed bytes read at a time: what corruption can cost
_GZIP_MAGIC = b"\x1f\x8b"


class DamagedStream(Exception):
    """Raised once everything before the damage has been read. `reason` is a reject
    reason (truncated_file | corrupt_file); `offset` the decompressed byte offset where
    the damage begins; readers set `record_offset` to the first record it cost."""

    def __init__(self, reason: str, detail: str, offset: int):
        super().__init__(detail)
        self.reason, self.detail, self.offset = reason, detail, offset
        self.record_offset = offset


class RecoveringStream:
    """File-like `read(n)` over a compressed file (gzip or bz2)."""

    def __init__(self, raw, codec: str):
        self.raw, self.codec = raw, codec
        self.buf = bytearray()
        self.d = self._new()
        self.in_member = False  # bytes of the current member fed but its end not seen
        self.in_pos = 0  # compressed bytes consumed
        self.out_pos = 0  # decompressed bytes handed out
        self.done = False
        self.damage: DamagedStream | None = None

    def _new(self):
        return zlib.decompressobj(wbits=31) if self.codec == "gzip" else bz2.BZ2Decompressor()

    def read(self, n: int = -1) -> bytes:
        while (n < 0 or len(self.buf) < n) and not self.done:
            self._fill()
        if not self.buf and self.damage is not None:
            raise self.damage
        take = len(self.buf) if n < 0 else min(n, len(self.buf))
        out = bytes(self.buf[:take])
        del self.buf[:take]
        self.out_pos += len(out)
        return out

    @property
    def total_out(self) -> int:
        """Decompressed bytes produced so far (handed out or buffered)."""
        return self.out_pos + len(self.buf)

    def _fail(self, reason: str, detail: str) -> None:
        self.damage = DamagedStream(reason, detail, self.total_out)
        self.done = True

    def _fill(self) -> None:
        chunk = self.raw.read(COMPRESSED_READ)
        if not chunk:
            if self.in_member:
                self._fail("truncated_file", f"compressed {self.codec} data ends early, at compressed byte "
                           f"{self.in_pos} (decompressed byte {self.total_out}): the file is truncated")
            self.done = True
            return
        self.in_pos += len(chunk)
        self._feed(chunk)

    def _feed(self, data: bytes) -> None:
        while data and not self.done:
            if not self.in_member:
                if self.codec == "gzip" and not data.strip(b"\x00"):
                    return  # padding after the last member
                if self.codec == "gzip" and not _GZIP_MAGIC.startswith(data[:2]):
                    self._fail("corrupt_file", f"bytes after the end of a gzip member at compressed byte "
                               f"~{self.in_pos - len(data)} are not gzip data")
                    return
                self.in_member = True
            try:
                self.buf += self.d.decompress(data)
            except (zlib.error, OSError, EOFError) as exc:
                self._fail("corrupt_file", f"corrupt {self.codec} data near compressed byte {self.in_pos} "
                           f"(decompressed byte {self.total_out}): {exc}")
                return
            if not self.d.eof:
                return
            data = self.d.unused_data  # the next member starts here (or nothing)
            self.d, self.in_member = self._new(), False

    def close(self) -> None:
        self.raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _ArrowStream:
    """pyarrow's stream for the other codecs, with its errors as DamagedStream."""

    def __init__(self, stream, codec: str):
        self.stream, self.codec, self.total_out = stream, codec, 0

    def read(self, n: int = -1) -> bytes:
        try:
            out = self.stream.read() if n < 0 else self.stream.read(n)
        except (OSError, pa.ArrowException) as exc:
            raise DamagedStream("corrupt_file", f"cannot decompress {self.codec} data after decompressed byte "
                                f"{self.total_out}: {exc}", self.total_out) from None
        self.total_out += len(out)
        return out

    def close(self) -> None:
        self.stream.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_compressed(fs, path: str, codec: str):
    """A read-only stream of the decompressed bytes of `path`."""
    if codec in ("gzip", "bz2"):
        return RecoveringStream(fs.open_input_stream(path, compression=None), codec)  # not "detect"
    return _ArrowStream(fs.open_input_stream(path, compression=codec), codec)
