"""fastText model files: training from (label, line) pairs, loading once per process,
and the checks that turn a missing, corrupt or wrong model into a UserError.

A worker loads a model the first time a step needs it and keeps it for every later
batch (the cache key includes size and mtime, so a retrained file is reloaded). The
driver calls `check_*` before the job starts, so a bad path fails in a second with a
one-line message instead of inside a Ray task after the read stage.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from zerolm.errors import UserError

PREFIX = "__label__"
QUALITY_LABELS = ("hq", "lq")  # high / low quality; the score is P(hq)
_CACHE: dict = {}  # resolved path -> ((path, size, mtime), model)


def _key(path: str | Path) -> tuple:
    p = Path(path).resolve()
    st = p.stat()
    return str(p), st.st_size, st.st_mtime_ns


def file_fingerprint(path: str | Path) -> list:
    """(path, size, mtime): part of a data run's config hash, so retraining a model
    in place makes the next run recompute instead of being a no-op."""
    try:
        return list(_key(path))
    except OSError:
        return [str(path), None, None]


FASTTEXT_MAGIC = 793712314


def verify_layout(path: Path) -> None:
    """Walk the structure of a fastText .bin file (header, args, dictionary, both
    matrices) and check it ends exactly at the end of the file. fastText's own loader
    trusts the sizes it reads: a truncated file can make it spin for minutes or
    allocate gigabytes before failing, so this runs first (in ~50 ms)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 92:
            raise ValueError(f"{size} bytes is too short for a fastText model")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mv:
            magic, _version = struct.unpack_from("<ii", mv, 0)
            if magic != FASTTEXT_MAGIC:
                raise ValueError("not a fastText model (wrong magic number)")
            off = 8 + 12 * 4 + 8  # magic, version; args: 12 int32 and one double
            n_entries, n_words, n_labels = struct.unpack_from("<iii", mv, off)
            _tokens, prune = struct.unpack_from("<qq", mv, off + 12)
            off += 28
            if n_entries < 0 or n_words + n_labels != n_entries or n_entries > size:
                raise ValueError("corrupt dictionary header")
            for _ in range(n_entries):  # word bytes, NUL, int64 count, int8 type
                end = mv.find(b"\0", off)
                if end < 0:
                    raise ValueError("truncated in the dictionary")
                off = end + 10
            off += 8 * max(prune, 0)  # (int32, int32) pairs of a pruned dictionary
            for _matrix in ("input", "output"):
                if off + 17 > size:
                    raise ValueError(f"truncated before the {_matrix} matrix")
                if mv[off]:  # quantized: another layout; leave it to fastText
                    return
                rows, cols = struct.unpack_from("<qq", mv, off + 1)
                if rows < 0 or cols < 0:
                    raise ValueError(f"corrupt {_matrix} matrix header")
                off += 17 + rows * cols * 4
            if off != size:
                raise ValueError(f"file has {size} bytes, its structure says {off} (truncated or damaged)")


def load(path: str | Path, what: str):
    """The fastText model at `path`, loaded once per process. `what` names the
    config key in errors ("quality.model")."""
    if not str(path):
        raise UserError(f"{what}: no model file given")
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what}: model file {p} not found")
    key = _key(p)
    cached = _CACHE.get(key[0])
    model = cached[1] if cached and cached[0] == key else None
    if model is None:
        import fasttext

        fasttext.FastText.eprint = lambda *a, **k: None  # its load-time warning about the API
        try:
            verify_layout(p)
            model = fasttext.load_model(str(p))
        except (ValueError, RuntimeError, MemoryError, OSError, struct.error) as exc:
            raise UserError(f"{what}: {p} is not a readable fastText model (corrupt or truncated?): {exc}")
        _CACHE[key[0]] = (key, model)  # one version per path: a retrained file replaces it
    return model


def labels_of(model) -> list[str]:
    return [label[len(PREFIX):] for label in model.get_labels()]


def check_quality_model(path: str | Path, what: str = "quality.model"):
    model = load(path, what)
    if sorted(labels_of(model)) != sorted(QUALITY_LABELS):
        raise UserError(f"{what}: {path} is not a quality model (labels {labels_of(model)[:5]}, "
                        f"expected {list(QUALITY_LABELS)}); train one with `zerolm data train-quality`")
    return model


def check_langid_model(path: str | Path, what: str = "langid.model"):
    model = load(path, what)
    labels = labels_of(model)
    if len(labels) < 2 or sorted(labels) == sorted(QUALITY_LABELS):
        raise UserError(f"{what}: {path} is not a language-id model (labels {labels[:5]}); "
                        "train one with `zerolm data train-langid`")
    return model


def predict(model, lines: list[str], k: int = 1) -> tuple[list[list[str]], list[np.ndarray]]:
    """Batch prediction: (labels without prefix, probabilities) per line. Uses the
    list form of fastText's predict, the one that works with numpy 2 (the single
    string form calls np.array(copy=False))."""
    if not lines:
        return [], []
    labels, probs = model.predict(lines, k=k)
    return [[lab[len(PREFIX):] for lab in row] for row in labels], [np.asarray(p) for p in probs]


def prob_of(model, lines: list[str], label: str) -> np.ndarray:
    """P(label) for each line (all labels asked for, so the label is always there)."""
    labels, probs = predict(model, lines, k=-1)
    out = np.zeros(len(lines), dtype=np.float64)
    for i, (labs, ps) in enumerate(zip(labels, probs)):
        for lab, p in zip(labs, ps):
            if lab == label:
                out[i] = min(float(p), 1.0)  # fastText adds 1e-5 inside its softmax
                break
    return out


def train(examples: list[tuple[str, str]], output: str | Path, **params):
    """Train a supervised model on (label, prepared line) pairs and save it
    atomically (a killed run never leaves a truncated model under the final name)."""
    import fasttext

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        train_file = Path(tmp) / "train.txt"
        with open(train_file, "w", encoding="utf-8") as f:
            for label, line in examples:
                f.write(f"{PREFIX}{label} {line}\n")
        tmp_model = Path(tmp) / "model.bin"
        # In a fresh process: fastText 0.9.3 reads memory it never initialized (see
        # _train_with_retries), so in a long-lived process that has allocated and freed
        # a lot, training diverged to NaN every time; a new process gets zeroed pages.
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(1) as pool:
            pool.apply(_train_and_save, (str(train_file), params, str(tmp_model)))
        model = fasttext.load_model(str(tmp_model))
        os.replace(tmp_model, output)
    return model


def _train_and_save(train_file: str, params: dict, model_path: str) -> None:
    import fasttext

    _train_with_retries(fasttext, train_file, params).save_model(model_path)


RETRIES = 4


def _train_with_retries(fasttext, train_file: str, params: dict):
    """Train; on divergence ("Encountered NaN": too high a rate for the data) retry
    with another seed and a lower rate, then give up clearly. Fewer than 10 threads
    are raised to 10 (see FastTextParams.thread: fastText 0.9.3 leaves part of the
    embeddings uninitialized otherwise)."""
    attempt = {**params, "thread": max(10, int(params.get("thread", 10)))}
    for i in range(RETRIES):
        try:
            return fasttext.train_supervised(input=train_file, verbose=0, **attempt)
        except RuntimeError as exc:
            if "NaN" not in str(exc):
                raise UserError(f"fastText training failed: {exc}")
            attempt = {**attempt, "seed": int(attempt.get("seed", 0)) + 1, "lr": float(attempt.get("lr", 0.1)) * 0.7}
    raise UserError(f"fastText training diverged (NaN) {RETRIES} times; try a lower fasttext.lr or more data")
