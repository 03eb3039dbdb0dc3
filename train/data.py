"""Reading packed tokens (the output of `zerolm pack`) for training and evaluation.

`PackedSplit` memory-maps one split: per source, the shards are one virtual array.
`WindowSampler` hands out windows of seq_len + 1 tokens (inputs x = w[:-1], targets
y = w[1:]); window i of a source starts at token i * seq_len, so consecutive windows
share one token and every token but the last < seq_len of a source is a target
exactly once per epoch.

Global sample g is a pure function of (seed, g): rank r of W takes g = k * W + r for
its k-th sample, so ranks never overlap, resuming needs only k, and the run is
reproducible whatever the number of workers that resumes it.
  * no mixture: one permutation of all windows of all sources per epoch;
  * mixture stages (manifest or trainer config): blocks of BLOCK samples draw their
    sources from the stage's weights; each source is read through its own per-epoch
    permutation, so within a source's epoch no window repeats.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from dataproc.mixture import resolve_weights
from zerolm.errors import UserError
from zerolm.stage import require_done

BLOCK = 1024  # samples per mixture block


class TokenSource:
    """The shards of one source as one read-only array of tokens."""

    def __init__(self, name: str, files: list[Path], dtype: str):
        self.name = name
        self.arrays = [np.memmap(f, dtype=np.dtype(dtype).newbyteorder("<"), mode="r") for f in files
                       if f.stat().st_size > 0]
        sizes = [len(a) for a in self.arrays]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.n_tokens = int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        if start < 0 or start + length > self.n_tokens:
            raise IndexError(f"{self.name}: tokens [{start}, {start + length}) out of range {self.n_tokens}")
        out = np.empty(length, dtype=np.int64)
        pos, i = 0, int(np.searchsorted(self.starts, start, side="right") - 1)
        while pos < length:
            a = self.arrays[i]
            lo = start + pos - int(self.starts[i])
            take = min(length - pos, len(a) - lo)
            out[pos:pos + take] = a[lo:lo + take]
            pos += take
            i += 1
        return out

    def n_windows(self, seq_len: int) -> int:
        return max(0, (self.n_tokens - 1) // seq_len)


def read_manifest(tokens_dir: str | Path) -> dict:
    tokens_dir = Path(tokens_dir)
    require_done(tokens_dir, "pack")
    try:
        return json.loads((tokens_dir / "manifest.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        raise UserError(f"{tokens_dir} has no readable manifest.json ({exc})")


def tokenizer_dir_of(tokens_dir: str | Path, manifest: dict) -> Path:
    """The tokenizer the tokens were packed with: the copy inside TOKENS_DIR (so the
    folder can move between machines), else the original path; checked by sha256."""
    info = manifest["tokenizer"]
    for candidate in (Path(tokens_dir) / info.get("copy", "tokenizer"), Path(info["path"])):
        f = candidate / "tokenizer.json"
        if f.is_file() and hashlib.sha256(f.read_bytes()).hexdigest() == info["sha256"]:
            return candidate
    raise UserError(f"the tokenizer the tokens in {tokens_dir} were packed with ({info['path']}) "
                    "is gone or changed (sha256 mismatch)")


class PackedSplit:
    def __init__(self, tokens_dir: str | Path, split: str, sources: list[str] | None = None):
        self.dir = Path(tokens_dir)
        self.manifest = read_manifest(self.dir)
        if split not in self.manifest["splits"]:
            raise UserError(f"{self.dir}: no split {split!r}")
        entries = self.manifest["splits"][split]
        names = sorted(entries) if sources is None else sources
        unknown = sorted(set(names) - set(entries))
        if unknown:
            raise UserError(f"{self.dir}: split {split!r} has no source(s) {unknown}; it has {sorted(entries)}")
        dtype = self.manifest["dtype"]
        self.sources = {n: TokenSource(n, [self.dir / s["file"] for s in entries[n]["shards"]], dtype) for n in names}
        self.vocab_size = int(self.manifest["vocab_size"])
        self.separator_id = int(self.manifest["separator_id"])

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.sources.values())


def _rng(*keys) -> np.random.Generator:
    seed = int.from_bytes(hashlib.blake2b(repr(keys).encode(), digest_size=8).digest(), "little")
    return np.random.default_rng(seed)


class WindowSampler:
    def __init__(self, data: PackedSplit, seq_len: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 mixture: list[dict] | None = None, total_samples: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        self.data, self.seq_len, self.seed = data, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.names = [n for n in sorted(data.sources) if data.sources[n].n_windows(seq_len) > 0]
        if not self.names:
            raise UserError(f"no source has more than {seq_len} tokens: nothing to train on at seq_len {seq_len}")
        self.n_windows = np.array([data.sources[n].n_windows(seq_len) for n in self.names], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.n_windows)])
        self._perms: dict = {}
        self.stages = self._stages(mixture or [], total_samples)
        self._block_counts: list[np.ndarray] = [np.zeros(len(self.names), dtype=np.int64)]

    # ------------------------------------------------------------ stages
    def _stages(self, mixture: list[dict], total: int | None) -> list[tuple[int, np.ndarray]]:
        """[(first global sample, weights over self.names)] for each stage."""
        if not mixture:
            return []
        if total is None and len(mixture) > 1:
            raise UserError("a mixture with several stages needs the total number of training samples")
        tokens = {n: int(self.data.sources[n].n_tokens) for n in self.names}
        fractions = np.array([float(m.get("fraction", 1.0)) for m in mixture])
        bounds = np.concatenate([[0], np.floor(np.cumsum(fractions / fractions.sum()) * (total or 0))]).astype(int)
        out = []
        for m, start in zip(mixture, bounds[:-1]):
            w = resolve_weights(m, tokens)
            # stage starts are aligned to blocks so a block never mixes two stages
            out.append((int(start) // BLOCK * BLOCK, np.array([w.get(n, 0.0) for n in self.names])))
        return out

    def stage_at(self, g: int) -> int:
        starts = [s for s, _ in self.stages]
        return int(np.searchsorted(starts, g, side="right") - 1)

    # ------------------------------------------------------------ sampling
    def _perm(self, key, n: int, epoch: int) -> np.ndarray:
        cache_key = (key, epoch)
        if cache_key not in self._perms:
            if len(self._perms) > 64:
                self._perms.clear()
            self._perms[cache_key] = _rng(self.seed, key, epoch).permutation(n)
        return self._perms[cache_key]

    def _block(self, b: int) -> np.ndarray:
        """Source index of each sample in mixture block b."""
        stage = self.stage_at(b * BLOCK)
        weights = self.stages[stage][1]
        counts = _rng(self.seed, "mix", b).multinomial(BLOCK, weights / weights.sum())
        return _rng(self.seed, "mix-order", b).permutation(np.repeat(np.arange(len(self.names)), counts))

    def _counts_before(self, b: int) -> np.ndarray:
        """How many samples each source got in blocks [0, b) (cached, computed in order)."""
        while len(self._block_counts) <= b:
            i = len(self._block_counts) - 1
            self._block_counts.append(self._block_counts[i] + np.bincount(self._block(i), minlength=len(self.names)))
        return self._block_counts[b]

    def locate(self, g: int) -> tuple[str, int]:
        """(source, window index) of global sample g."""
        if not self.stages:
            total = int(self.offsets[-1])
            epoch, pos = divmod(g, total)
            w = int(self._perm("all", total, epoch)[pos])
            s = int(np.searchsorted(self.offsets, w, side="right") - 1)
            return self.names[s], w - int(self.offsets[s])
        b, j = divmod(g, BLOCK)
        block = self._block(b)
        s = int(block[j])
        k = int(self._counts_before(b)[s]) + int(np.count_nonzero(block[:j] == s))
        epoch, pos = divmod(k, int(self.n_windows[s]))
        return self.names[s], int(self._perm(self.names[s], int(self.n_windows[s]), epoch)[pos])

    def window(self, g: int) -> np.ndarray:
        name, w = self.locate(g)
        return self.data.sources[name].read(w * self.seq_len, self.seq_len + 1)

    def batch(self, k0: int, batch_size: int) -> np.ndarray:
        """This rank's samples k0 .. k0+batch_size-1 as a (B, seq_len + 1) int64 array."""
        gs = [(k0 + i) * self.world_size + self.rank for i in range(batch_size)]
        return np.stack([self.window(g) for g in gs])

    @property
    def epoch_samples(self) -> int:
        return int(self.offsets[-1])


def eval_windows(source: TokenSource, seq_len: int, max_windows: int, rank: int = 0, world_size: int = 1):
    """Evaluation windows of one source, in order, split across ranks: window i goes to
    rank i % world_size. Deterministic and the same for every run."""
    n = min(source.n_windows(seq_len), max_windows)
    for i in range(rank, n, world_size):
        yield source.read(i * seq_len, seq_len + 1)
