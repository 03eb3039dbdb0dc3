"""Atomic, resumable checkpoints: RUN_DIR/checkpoints/step_NNNNNNNN/.

Every rank writes into `tmp-step_N/` (DeepSpeed's model + ZeRO optimizer shards,
scheduler, and our per-rank RNG states); after a barrier, rank 0 writes meta.json and
renames the folder to `step_N/`. A rename is atomic, so a `step_*` folder is always
complete and a crash leaves at most a `tmp-*` folder, which is never loaded and is
removed by the next save. The last `keep_last` checkpoints are kept.

A checkpoint is data, never code: DeepSpeed unpickles its files with
`torch.load(weights_only=False)`, which runs whatever a crafted file names. So every
load here goes through `weights_only_loads` (torch's restricted unpickler, plus the
few DeepSpeed classes its files hold), and `verify` scans a checkpoint's pickles for
anything else before any worker starts. meta.json records each file's size and
SHA-256, so a truncated or altered checkpoint is found, named, and skipped for the
newest intact one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from train.distributed import WorkerContext, barrier
from zerolm.errors import UserError

PREFIX, TMP_PREFIX, BROKEN_PREFIX = "step_", "tmp-step_", "broken-"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and (p / "meta.json").is_file():
            out.append((int(p.name[len(PREFIX):]), p))
    return sorted(out)


def latest_checkpoint(run_dir: str | Path) -> tuple[int, Path] | None:
    """The newest checkpoint whose files are all there at their recorded sizes (cheap:
    every rank calls this when it starts, Ray Train's retries included)."""
    for step, path in reversed(list_checkpoints(run_dir)):
        if verify(path, full=False) is None:
            return step, path
    return None


def set_aside_broken(run_dir: str | Path, warn=print) -> tuple[int, Path] | None:
    """On the driver before a resume: fully verify checkpoints newest first; rename each
    broken one to broken-step_N (kept for inspection, never loaded) with a warning naming
    it, and return the newest intact one. If none is intact, nothing is renamed and the
    run is refused: restarting from step 0 silently would discard the run's progress."""
    found = list_checkpoints(run_dir)
    problems = []
    for step, path in reversed(found):
        problem = verify(path, full=True)
        if problem is None:
            for broken, why in problems:
                os.replace(broken, broken.with_name(BROKEN_PREFIX + broken.name))
                warn(f"warning: checkpoint {broken} is broken ({why}); set aside as {BROKEN_PREFIX}{broken.name}, "
                     f"resuming from {path.name}")
            return step, path
        problems.append((path, problem))
    if problems:
        listed = "; ".join(f"{p.name}: {why}" for p, why in problems)
        raise UserError(f"{run_dir}: no intact checkpoint to resume from ({listed}); pass --overwrite to start over")
    return None


# What DeepSpeed's checkpoint files hold besides tensors and plain containers.
_DEEPSPEED_GLOBALS = ("deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
                      "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                      "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler")


def _allowed_globals() -> list:
    import importlib

    out = []
    for name in _DEEPSPEED_GLOBALS:
        module, _, attr = name.rpartition(".")
        with contextlib.suppress(ImportError, AttributeError):
            out.append(getattr(importlib.import_module(module), attr))
    return out


@contextlib.contextmanager
def weights_only_loads():
    """Within: every torch.load (DeepSpeed's included) is weights_only with the
    allow-list; a file holding anything else is a UserError naming it, unexecuted."""
    real = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(_allowed_globals()):
                return real(f, *args, **kwargs)
        except Exception as e:
            if "Weights only load failed" in str(e):
                raise UserError(f"refusing to load {f}: it holds objects other than tensors and DeepSpeed's "
                                f"checkpoint state (a crafted or foreign file?)") from None
            raise

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _file_table(folder: Path) -> dict:
    return {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != "meta.json"}


def verify(path: Path, full: bool = True) -> str | None:
    """None if the checkpoint is intact and holds only data; else what is wrong.
    full=False checks only that the recorded files are there at their sizes."""
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"meta.json unreadable: {e}"
    recorded = meta.get("files")
    if not isinstance(recorded, dict) or not recorded:
        return "meta.json lists no files (written by an older zerolm, or edited)"
    present = {p.name for p in path.iterdir() if p.is_file() and p.name != "meta.json"}
    if present != set(recorded):
        missing, extra = sorted(set(recorded) - present), sorted(present - set(recorded))
        return "; ".join(filter(None, [missing and f"missing {', '.join(missing)}",
                                       extra and f"unexpected {', '.join(extra)}"]))
    for name, want in recorded.items():
        if (path / name).stat().st_size != want.get("bytes"):
            return f"{name} is {(path / name).stat().st_size} bytes, {want.get('bytes')} when it was written"
    if not full:
        return None
    for name, want in recorded.items():
        if _sha256(path / name) != want.get("sha256"):
            return f"{name} differs from the SHA-256 recorded when it was written"
    allowed = set(_DEEPSPEED_GLOBALS)
    for name in sorted(present):
        if name.endswith(".pt"):
            try:
                unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path / name)) - allowed
            except Exception as e:  # not a torch file at all
                return f"{name} is not a readable torch file ({type(e).__name__})"
            if unsafe:
                return f"{name} refers to {', '.join(sorted(unsafe))}, which a checkpoint never holds"
    return None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
             "numpy": _numpy_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _numpy_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, run_dir: str | Path, step: int, meta: dict, ctx: WorkerContext, keep_last: int) -> Path:
    root = checkpoint_root(run_dir)
    tmp_tag = f"{TMP_PREFIX}{step:08d}"
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if (root / tmp_tag).exists():
            shutil.rmtree(root / tmp_tag)
    barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state={"step": step}, save_latest=False)
    torch.save(rng_state(), root / tmp_tag / f"rng_rank{ctx.rank:05d}.pt")
    barrier()
    final = root / tag_for(step)
    if ctx.is_main:
        files = _file_table(root / tmp_tag)  # every rank's files are written (barrier above)
        (root / tmp_tag / "meta.json").write_text(json.dumps({**meta, "step": step, "files": files}, indent=2),
                                                  encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(root / tmp_tag, final)
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    return final


def load(engine, path: Path, ctx: WorkerContext) -> dict:
    """Restore engine (model, optimizer, scheduler) and this rank's RNG; return meta."""
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    if meta.get("world_size") != ctx.world_size:
        raise UserError(f"checkpoint {path} was written by {meta.get('world_size')} workers, this run has "
                        f"{ctx.world_size}; resume with the same scaling.num_workers")
    with weights_only_loads():
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_lr_scheduler_states=True)
        if load_path is None:
            raise UserError(f"DeepSpeed could not load checkpoint {path}")
        set_rng_state(torch.load(path / f"rng_rank{ctx.rank:05d}.pt"))  # listed in meta: verify saw it
    return meta
