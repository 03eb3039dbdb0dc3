"""The shared loop's contract with a Task, on real DeepSpeed (CPU): the loss is
normalised by the count over all micro-batches and ranks of a step (not a mean of
means), and frozen models are never trained, stay in eval mode and are not
checkpointed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.config import StageConfig
from train.model import Transformer
from train.model_config import ModelConfig

HERE = Path(__file__).resolve().parent
MCFG = ModelConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, max_seq_len=32)


def test_step_gradient_is_summed_loss_over_the_count_of_all_ranks_and_micro_batches(tmp_path):
    """Two ranks (torchrun, gloo, ZeRO-2), micro-batches counting 1, 60, 25 and 7
    targets: the step's gradient norm equals that of sum(losses) / 93, and a mean of
    the four per-micro-batch means would give a different one."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(HERE.parents[1])}
    port = 29500 + os.getpid() % 1000
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(port), str(HERE / "loop_ranks.py")],
                       capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in r.stdout.splitlines() if line.startswith("rank")]
    assert r.returncode == 0 and len(lines) == 2, r.stdout[-2000:] + r.stderr[-2000:]


class FrozenTask:
    """A trained model and a frozen copy of it (as DPO's reference would be)."""

    name = "frozen-test"

    def __init__(self, share: bool = False):
        torch.manual_seed(0)
        self.model = Transformer(MCFG)
        self.reference = Transformer(MCFG)
        self.reference.load_state_dict(self.model.state_dict())
        if share:
            self.reference.output = self.model.output
        self.reference.train()  # the loop must put it in eval mode
        self.start = {k: v.clone() for k, v in self.reference.state_dict().items()}

    def build_model(self):
        return self.model

    def frozen_models(self):
        return {"reference": self.reference}

    def micro_batch(self, step, micro):
        g = torch.Generator().manual_seed(step * 10 + micro)
        x = torch.randint(0, 64, (2, 8), generator=g)
        return {"x": x, "count": x.numel(), "tokens": x.numel()}

    def loss(self, engine, batch):
        _, summed = engine(batch["x"], batch["x"], reduction="sum")
        with torch.no_grad():
            _, ref = self.reference(batch["x"], batch["x"], reduction="sum")
        return summed, batch["count"], {"ref_loss": (ref.item(), batch["count"])}

    def evaluate(self, engine):
        return {}

    def flops_per_token(self):
        return MCFG.flops_per_token(8)


def _cfg(tmp_path) -> StageConfig:
    return StageConfig.model_validate({"output": str(tmp_path), "data": {"micro_batch_size": 2, "grad_accum": 2},
                                       "deepspeed": {"zero_stage": 0, "precision": "fp32"}, "optim": {"lr": 1e-2},
                                       "log_every": 1, "checkpoint": {"every": 2}, "scaling": {"launcher": "local"}})


def test_frozen_models_are_not_trained_nor_checkpointed(tmp_path):
    from train.distributed import setup
    from train.loop import run_training
    from train.metrics import read_metrics

    task = FrozenTask()
    ctx = setup(False)
    result = run_training(_cfg(tmp_path), task, ctx, tmp_path, 4, echo=lambda *_: None)
    assert not task.reference.training and not any(p.requires_grad for p in task.reference.parameters())
    for k, v in task.reference.state_dict().items():
        assert torch.equal(v, task.start[k]), k
    trained = result["engine"].module.state_dict()
    assert any(not torch.equal(trained[k], task.start[k]) for k in task.start)  # the trained model did move
    rows = read_metrics(tmp_path, "train")
    assert len(rows) == 4 and all("ref_loss" in r for r in rows)
    saved = torch.load(next((tmp_path / "checkpoints").glob("step_*/mp_rank_00_model_states.pt")), weights_only=False)
    assert set(saved["module"]) == set(trained)  # only the trained model's tensors, once


def test_a_frozen_model_sharing_weights_is_refused(tmp_path):
    from train.distributed import setup
    from train.loop import run_training

    with pytest.raises(RuntimeError, match="shares parameters"):
        run_training(_cfg(tmp_path), FrozenTask(share=True), setup(False), tmp_path, 2, echo=lambda *_: None)


@pytest.mark.parametrize("tied", [False, True])
def test_token_tables_train_at_their_own_learning_rates(tied):
    """optim.embedding_lr / lm_head_lr: each table is its own AdamW group whose peak lr
    the schedule scales like the others'. Adam's first step moves every weight by
    about lr (sign of the gradient), so the step sizes show which lr each took; a
    tied table is the output projection too and takes lm_head_lr. Tables with their own
    lr are not decayed."""
    import deepspeed

    from train.loop import deepspeed_config
    from train.schedule import make_lambda, param_groups

    torch.manual_seed(0)
    model = Transformer(MCFG.model_copy(update={"tie_embeddings": tied}))
    cfg = StageConfig.model_validate({"optim": {"lr": 1e-3, "embedding_lr": 1e-1, "lm_head_lr": 1e-2,
                                                "weight_decay": 0.1},
                                      "deepspeed": {"zero_stage": 0, "precision": "fp32"}})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(param_groups(model, cfg.optim), lr=cfg.optim.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, make_lambda(10, cfg.optim, cfg.schedule))
    assert sorted(g["lr"] for g in opt.param_groups) == ([1e-3, 1e-3, 1e-2] if tied else [1e-3, 1e-3, 1e-2, 1e-1])
    # the matrices keep their decay; the tables (own lr) have none
    assert sorted((g["lr"], g["weight_decay"]) for g in opt.param_groups)[-1] == ((1e-2 if tied else 1e-1), 0.0)
    assert any(g["weight_decay"] == 0.1 for g in opt.param_groups)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from train.distributed import setup

    setup(False)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                           config=deepspeed_config(cfg, 1, False), dist_init_required=False)
    x = torch.randint(0, 64, (2, 8))
    _, loss = engine(x, x)
    engine.backward(loss)
    engine.step()
    moved = {k: (v - before[k]).abs() for k, v in engine.module.state_dict().items()}
    top = lambda k: moved[k].max().item()  # noqa: E731
    warm = make_lambda(10, cfg.optim, cfg.schedule)(0)  # the first step's share of each peak
    assert top("layers.0.attention.wqkv.weight") == pytest.approx(1e-3 * warm, rel=0.05)
    assert top("output.weight") == pytest.approx(1e-2 * warm, rel=0.05)
    assert top("tok_embeddings.weight") == pytest.approx((1e-2 if tied else 1e-1) * warm, rel=0.05)
