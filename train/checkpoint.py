"""Atomic, resumable checkpoints: RUN_DIR/checkpoints/step_NNNNNNNN/.

Every rank writes into `tmp-step_N/` (DeepSpeed's model + ZeRO optimizer shards,
scheduler, and our per-rank RNG states); after a barrier, rank 0 writes meta.json and
renames the folder to `step_N/`. A rename is atomic, so a `step_*` folder is always
complete and a crash leaves at most a `tmp-*` folder, which is never loaded and is
removed by the next save. The last `keep_last` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from train.distributed import WorkerContext, barrier
from zerolm.errors import UserError

PREFIX, TMP_PREFIX = "step_", "tmp-step_"


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
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


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
        (root / tmp_tag / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2), encoding="utf-8")
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
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_lr_scheduler_states=True)
    if load_path is None:
        raise UserError(f"DeepSpeed could not load checkpoint {path}")
    rng_file = path / f"rng_rank{ctx.rank:05d}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return meta
