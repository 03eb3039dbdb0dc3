"""A resume never runs code from a checkpoint and never trusts a damaged one: crafted
pickles are refused unexecuted, and a truncated, altered or incomplete checkpoint is
named, set aside, and the run resumes from the newest intact one (real DeepSpeed,
local launcher, the session's tokens)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from train.checkpoint import BROKEN_PREFIX, list_checkpoints, weights_only_loads
from train.config import PretrainConfig
from train.metrics import MetricsLogger, StaleAttempt, read_metrics
from train.runner import run_stage
from zerolm.errors import UserError


class _RunsCode:
    """Unpickling this runs a shell command: what a crafted checkpoint file does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _config(tokens_dir, out) -> PretrainConfig:
    return PretrainConfig.model_validate({
        "output": str(out), "max_steps": 4, "log_every": 1,
        "model": {"preset": "tiny", "overrides": {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1,
                                                  "max_seq_len": 64}},
        "data": {"tokens": str(tokens_dir), "seq_len": 32, "micro_batch_size": 2},
        "eval": {"every": 0, "max_windows": 2}, "checkpoint": {"every": 2, "keep_last": 3},
        "scaling": {"launcher": "local"}, "export_hf": False})


@pytest.fixture
def interrupted(tokens_dir, tmp_path):
    """A finished 4-step run with checkpoints at steps 2 and 4, made to look interrupted
    (no _SUCCESS): the same command resumes it."""
    out = tmp_path / "run"
    run_stage("pretrain", _config(tokens_dir, out), echo=lambda *_: None)
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    (out / "_SUCCESS").unlink()
    return out, dict(list_checkpoints(out))


def _resume(tokens_dir, out) -> list[str]:
    lines: list[str] = []
    run_stage("pretrain", _config(tokens_dir, out), echo=lines.append)
    return lines


def test_a_crafted_pickle_is_never_executed(tokens_dir, interrupted, tmp_path):
    out, ckpts = interrupted
    marker = tmp_path / "ran"
    target = ckpts[4] / "mp_rank_00_model_states.pt"
    torch.save({"module": _RunsCode(marker)}, target)
    # The attacker also fixes the recorded size and checksum: only the content check is left.
    from train.checkpoint import _file_table
    meta = json.loads((ckpts[4] / "meta.json").read_text())
    meta["files"] = _file_table(ckpts[4])
    (ckpts[4] / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="mp_rank_00_model_states.pt"), weights_only_loads():
        torch.load(target)  # what DeepSpeed's loader does inside, weights_only=False
    lines = _resume(tokens_dir, out)
    assert not marker.exists()
    assert any("step_00000004 is broken" in line and "posix.system" in line for line in lines), lines
    assert (ckpts[4].parent / f"{BROKEN_PREFIX}step_00000004").is_dir() and (out / "_SUCCESS").is_file()
    assert any("resumed from" in line and "step_00000002" in line for line in lines), lines


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_rng"])
def test_a_damaged_checkpoint_is_named_and_the_previous_one_resumes(tokens_dir, interrupted, damage):
    out, ckpts = interrupted
    states = ckpts[4] / "mp_rank_00_model_states.pt"
    if damage == "truncate":
        states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    elif damage == "flip":
        data = bytearray(states.read_bytes())
        data[len(data) // 2] ^= 0xFF
        states.write_bytes(bytes(data))
    else:
        (ckpts[4] / "rng_rank00000.pt").unlink()
    losses_before = [r["loss"] for r in read_metrics(out, "train")]
    lines = _resume(tokens_dir, out)
    why = {"truncate": "mp_rank_00_model_states.pt is", "flip": "mp_rank_00_model_states.pt differs",
           "delete_rng": "missing rng_rank00000.pt"}[damage]
    assert any("step_00000004 is broken" in line and why in line for line in lines), lines
    assert any("resumed from" in line and "step_00000002" in line for line in lines), lines
    assert [s for s, _ in list_checkpoints(out)] == [2, 4] and (out / "_SUCCESS").is_file()
    # metrics.jsonl itself (not only read_metrics, which keeps a step's last row) is one curve
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4] and len(losses_before) == 4


def test_no_intact_checkpoint_is_refused_not_restarted(tokens_dir, interrupted):
    out, ckpts = interrupted
    for path in ckpts.values():
        (path / "rng_rank00000.pt").unlink()
    with pytest.raises(UserError, match="no intact checkpoint.*step_00000004: missing.*step_00000002: missing"):
        _resume(tokens_dir, out)
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]  # nothing renamed, nothing lost


def test_an_older_attempt_stops_instead_of_interleaving_metrics(tmp_path):
    """A worker whose driver was killed keeps training; once the run is resumed by a
    new attempt, its next log line stops it, and the file is cut at the resumed step."""
    old = MetricsLogger(tmp_path, enabled=True)
    old.begin(0)
    for step in (1, 2, 3):
        old.log(step, {"loss": 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # torn by the kill
    new = MetricsLogger(tmp_path, enabled=True)
    new.begin(2)  # resumed from the step-2 checkpoint
    with pytest.raises(StaleAttempt):
        old.log(4, {"loss": 1.0})
    new.log(3, {"loss": 0.5})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 1.0), (3, 0.5)]
