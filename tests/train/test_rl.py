"""Online RL (GRPO, PPO) on real small setups.

The session's tiny pretrained model is fine-tuned on generated arithmetic problems
until it answers 30% of them right (not all: there must be something to learn);
then GRPO and PPO run 200 rollouts with the verifiable arithmetic reward and must
raise it, with a bounded KL.
PPO and GRPO must raise the format reward of the session's chat model. Both stages run under Ray Train + DeepSpeed ZeRO-2 on 2 CPU
workers, and their exports load in transformers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from train.losses import clipped_policy_loss, clipped_value_loss, gae, group_advantages, kl_penalty, masked_whiten
from train.rewards import Sample, arithmetic, arithmetic_problems, final_number, format_reward
from train.runner import run_stage
from train.stages import get_stage
from zerolm.errors import UserError

QUIET = {"echo": lambda *_: None}


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _sums_only(rows):
    return [r for r in rows if r["prompt"].startswith(("计算", "Compute"))]


@pytest.fixture(scope="module")
def arithmetic_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("arith")
    sft = _sums_only(arithmetic_problems(3000, seed=2, max_operand=6))[:800]
    prompts = [{"prompt": r["prompt"], "answer": r["answer"]}
               for r in _sums_only(arithmetic_problems(3000, seed=3, max_operand=6))[:200]]
    return _write(d / "sft.jsonl", sft), _write(d / "prompts.jsonl", prompts)


def greedy_accuracy(model_dir, prompts_file, n: int = 48) -> float:
    from serve.engine import Engine, Request
    from serve.loading import load_model
    from serve.sampling import SamplingParams
    from train.chat import ChatTokenizer

    rows = [json.loads(line) for line in prompts_file.read_text(encoding="utf-8").splitlines()][:n]
    chat = ChatTokenizer(model_dir / "hf")
    engine = Engine(load_model("m", model_dir / "hf", device="cpu"))
    params = SamplingParams(max_tokens=24, temperature=0, stop_ids=(chat.end_id,))
    results = engine.generate([Request(chat.prompt_ids([{"role": "user", "content": r["prompt"]}]), params)
                               for r in rows])
    return sum(arithmetic(Sample([], res.text, 0, True, r)) for res, r in zip(results, rows)) / len(rows)


@pytest.fixture(scope="module")
def arithmetic_model(tiny_model_dir, arithmetic_files):
    """SFT on worked answers in rounds of 50 steps, stopped once it answers 30%
    of held-out problems right: most are still wrong, so there is something to learn.
    (How fast a 0.25M-parameter model gets there varies with its pretraining; with
    more SFT it reaches ~0.9, so the task is within its capacity.)"""
    init, out = tiny_model_dir, None
    for round_ in range(24):
        out = tiny_model_dir.parent / f"tiny_arith_{round_}"
        cfg = get_stage("sft").config.model_validate({
            "output": str(out), "init_from": str(init), "max_steps": 150 if round_ == 0 else 50, "log_every": 50,
            "data": {"paths": [str(arithmetic_files[0])], "seq_len": 128, "micro_batch_size": 16,
                     "prompt_dedup": {"enabled": False}},
            "optim": {"lr": 3e-3, "min_lr_ratio": 1.0, "weight_decay": 0.1}, "schedule": {"warmup_frac": 0.0},
            "eval": {"every": 0, "generate": 0}, "checkpoint": {"every": 0}, "scaling": {"launcher": "local"}})
        run_stage("sft", cfg, **QUIET)
        if greedy_accuracy(out, arithmetic_files[1]) >= 0.3:
            return out
        init = out
    return out


def rl_cfg(stage: str, init, prompts, out, **kw):
    base = {"output": str(out), "init_from": str(init), "reward": "arithmetic", "rollouts": 40,
            "data": {"paths": [str(prompts)], "seq_len": 96, "micro_batch_size": 32, "grad_accum": 2,
                     "val_prompts": 48},
            "rollout": {"prompts": 8, "samples": 8, "max_new_tokens": 24}, "optim": {"lr": 5e-4},
            "eval": {"every": 10, "at_start": True, "prompts": 48}, "checkpoint": {"every": 0}, "log_every": 5,
            "scaling": {"launcher": "local"}}
    for key, value in kw.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return get_stage(stage).config.model_validate(base)


def metrics(out, kind):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_rl_raises_the_format_reward_with_bounded_kl(stage, sft_model_dir, arithmetic_files, tmp_path):
    """The format rule (end the turn within 12 tokens) on the session's chat model,
    whose answers are often longer: a reward the model can learn in 20 rollouts."""
    out = tmp_path / stage
    cfg = rl_cfg(stage, sft_model_dir, arithmetic_files[1], out, reward="format", reward_max_tokens=12, rollouts=20,
                 rollout={"max_new_tokens": 32}, optim={"lr": 1e-3}, eval={"every": 0, "at_start": True},
                 log_every=1)
    run_stage(stage, cfg, **QUIET)
    evals, train = metrics(out, "eval"), metrics(out, "train")
    curve = [r["reward"] for r in train if "reward" in r]  # mean reward of each rollout's sampled answers
    assert 0.05 < curve[0] < 0.8, curve  # something to learn
    assert sum(curve[-3:]) / 3 >= curve[0] + 0.1, curve
    assert [e["step"] for e in evals] == [0, cfg.rollouts * cfg.steps_per_rollout()]
    assert all(0 <= e["val/reward"] <= 1 for e in evals)
    assert all(math.isfinite(r["loss"]) and r["kl"] < 1.0 for r in train), [r["kl"] for r in train]
    for key in ("reward", "kl", "entropy", "clip_fraction", "response_tokens", "rollout/tokens_per_s"):
        assert key in train[0], key
    if stage == "ppo":
        assert all(math.isfinite(r["value_loss"]) for r in train)


def quarter_means(curve: list[float]) -> tuple[float, float]:
    k = max(1, len(curve) // 4)
    return sum(curve[:k]) / k, sum(curve[-k:]) / k


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_rl_raises_the_verifiable_arithmetic_reward_with_bounded_kl(stage, arithmetic_model, arithmetic_files,
                                                                     tmp_path):
    """200 rollouts of 8 problems x 8 sampled answers; the logged reward's last quarter
    beats its first. The session's models are reproducible (the data stages write
    identical files, training is seeded), so this model is the same in every session on
    a machine. Measured on it (first -> last quarter of the sampled reward): GRPO lr 3e-4
    0.22 -> 0.27, 5e-4 0.22 -> 0.29, 1e-3 0.20 -> 0.24, 3e-4 for 400 rollouts
    0.22 -> 0.30, 3e-4 without KL 0.23 -> 0.29; PPO 3e-4 0.24 -> 0.29, 1e-3 0.24 -> 0.32.
    Held-out greedy reward on 48 problems: 0.23 before, 0.23-0.27 after (too few
    problems, and a 0.25M model, to assert). Before the data stages were reproducible,
    one session's model stayed flat (0.178 -> 0.175): the margin here is small."""
    out = tmp_path / stage
    cfg = rl_cfg(stage, arithmetic_model, arithmetic_files[1], out, rollouts=200,
                 optim={"lr": {"grpo": 5e-4, "ppo": 1e-3}[stage], "min_lr_ratio": 0.1},
                 log_every=10, eval={"every": 0})
    run_stage(stage, cfg, **QUIET)
    evals, train = metrics(out, "eval"), metrics(out, "train")
    curve = [r["reward"] for r in train if "reward" in r]  # each a mean over 10 steps' rollouts
    first, last = quarter_means(curve)
    assert 0 < evals[0]["val/reward"] < 0.6, evals  # something right, much to learn
    assert 0 < first < 0.75 and last >= first + 0.03, curve
    assert [e["step"] for e in evals] == [0, cfg.rollouts * cfg.steps_per_rollout()]
    assert all(0 <= r["reward"] <= 1 for r in train if "reward" in r)
    assert all(math.isfinite(r["loss"]) and r["kl"] < 1.0 for r in train), [r["kl"] for r in train]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_rl_stages_on_ray_train_zero2(stage, ray_session, arithmetic_model, arithmetic_files, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / stage
    cfg = rl_cfg(stage, arithmetic_model, arithmetic_files[1], out, rollouts=2,
                 rollout={"prompts": 4, "samples": 4}, data={"micro_batch_size": 8, "grad_accum": 2},
                 scaling={"launcher": "ray", "num_workers": 2}, deepspeed={"zero_stage": 2},
                 threads_per_worker=1, eval={"every": 0, "prompts": 8, "at_start": False})
    result = run_stage(stage, cfg, **QUIET)
    assert (out / "_SUCCESS").is_file() and math.isfinite(result["eval"]["val/reward"])
    train = metrics(out, "train")
    assert train[-1]["step"] == cfg.rollouts * cfg.steps_per_rollout()
    assert all(math.isfinite(r["loss"]) for r in train)
    hf = AutoModelForCausalLM.from_pretrained(out / "hf")
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert "score" not in json.dumps(list(hf.state_dict()))  # PPO exports the actor only


def test_bad_prompts_are_rejected_and_bad_settings_are_one_line_errors(arithmetic_model, tmp_path):
    good = [{"prompt": f"计算：{i} + 1 = ?", "answer": str(i + 1)} for i in range(30)]
    f = _write(tmp_path / "p.jsonl", good + [{"answer": "3"}, {"prompt": 7}, {"prompt": "<|im_end|> hi"}])
    with open(f, "a", encoding="utf-8") as fh:
        fh.write('{"prompt": broken\n')
    stage = get_stage("grpo")
    cfg = rl_cfg("grpo", arithmetic_model, f, tmp_path / "run", data={"val_prompts": 4})
    plan = stage.plan(stage.absolute(cfg), echo=lambda *_: None)
    assert plan.info["data"]["rejected"] == 4 and plan.info["data"]["train_prompts"] == 26
    with pytest.raises(UserError, match="neither a rule"):
        stage.plan(stage.absolute(rl_cfg("grpo", arithmetic_model, f, tmp_path / "r2", reward="nope")))
    with pytest.raises(UserError, match="not a reward model"):  # an SFT run given as the reward
        stage.plan(stage.absolute(rl_cfg("grpo", arithmetic_model, f, tmp_path / "r5", reward=str(arithmetic_model))))
    with pytest.raises(UserError, match="not a multiple"):
        rl_cfg("grpo", arithmetic_model, f, tmp_path / "r3", rollout={"prompts": 3, "samples": 3}).steps_per_rollout()
    with pytest.raises(UserError, match="more than data.val_prompts"):
        stage.plan(stage.absolute(rl_cfg("grpo", arithmetic_model, f, tmp_path / "r4", data={"val_prompts": 40})))


# ----------------------------------------------------------------- rewards and losses

def test_rule_rewards():
    s = lambda text, **kw: Sample(prompt=[], text=text, tokens=kw.get("tokens", 5), ended=kw.get("ended", True),
                                  record={"answer": "12"})
    assert final_number("3 + 9 = 12，答案是 12。") == 12.0 and final_number("1,200 apples") == 1200.0
    assert arithmetic(s("so the answer is 12.")) == 1.0 and arithmetic(s("12 or 13")) == 0.0
    assert arithmetic(s("no number")) == 0.0
    assert format_reward(s("ok")) == 1.0 and format_reward(s("ok", ended=False)) == 0.0
    assert format_reward(s("ok", tokens=65)) == 0.0 and format_reward(s("  ")) == 0.0


def test_group_advantages_against_their_formulas():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 3.0])
    g = group_advantages(r, 4, "grpo")
    first = r[:4]
    torch.testing.assert_close(g[:4], (first - first.mean()) / (first.std() + 1e-6))
    assert torch.all(g[4:] == 0)  # a group of equal rewards teaches nothing
    loo = group_advantages(r, 4, "rloo")
    for i in range(4):
        others = torch.cat([first[:i], first[i + 1:]])
        assert loo[i].item() == pytest.approx((first[i] - others.mean()).item())
    rpp = group_advantages(r, 4, "reinforce++")
    assert rpp.mean().item() == pytest.approx(0.0, abs=1e-6) and rpp.std().item() == pytest.approx(1.0, abs=1e-4)


def test_kl_estimators_and_clipped_losses():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), logp - ref)
    d = ref - logp
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), d.exp() - d - 1)
    assert torch.all(kl_penalty(logp, ref, "k3") >= 0)
    adv = torch.tensor([1.0, -1.0])
    loss, clipped = clipped_policy_loss(torch.log(torch.tensor([1.5, 1.5])), torch.zeros(2), adv, 0.2)
    torch.testing.assert_close(loss, torch.tensor([-1.2, 1.5]))  # gains clipped, losses not
    assert clipped.tolist() == [True, False]
    v = clipped_value_loss(torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([2.0]), 0.5)
    torch.testing.assert_close(v, torch.tensor([0.5 * 1.5 ** 2]))


def test_gae_equals_the_recursion_and_stops_at_the_end():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 1 + [0] * 5], dtype=torch.float)
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for i in range(3):
        n = int(mask[i].sum())
        a, want = 0.0, [0.0] * 6
        for t in reversed(range(n)):
            nxt = values[i, t + 1].item() if t + 1 < n else 0.0
            a = rewards[i, t].item() + gamma * nxt - values[i, t].item() + gamma * lam * a
            want[t] = a
        torch.testing.assert_close(adv[i], torch.tensor(want))
        torch.testing.assert_close(ret[i, :n], adv[i, :n] + values[i, :n])
    w = masked_whiten(adv, mask)
    assert w[mask > 0].mean().abs().item() < 1e-5 and torch.all(w[mask == 0] == 0)


def test_policy_sampler_follows_new_weights(tiny_model_dir):
    from serve.engine import Request
    from serve.sampling import SamplingParams
    from train.generation import PolicySampler, engine_for
    from train.weights import load_transformer, model_config_of

    model = load_transformer(tiny_model_dir / "hf")
    mcfg = model_config_of(tiny_model_dir / "hf")
    sampler = PolicySampler(model.state_dict(), mcfg, tiny_model_dir / "hf", torch.device("cpu"))
    req = lambda: [Request([5, 17, 42], SamplingParams(max_tokens=8, temperature=0))]
    before = sampler.generate(req())[0].output_ids
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    sampler.refresh(model.state_dict())
    fresh = engine_for(model.state_dict(), mcfg, tiny_model_dir / "hf", torch.device("cpu"))
    assert sampler.generate(req())[0].output_ids == fresh.generate(req())[0].output_ids != before
