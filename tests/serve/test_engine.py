"""The engine against the plain training model: the KV-cached, batched decode (each
sequence in its own cache row, at its own position) must produce what full forward
passes produce, token for token, in eager shapes and in the rounded-up shapes that
CUDA graphs replay."""

from __future__ import annotations

import pytest
import torch

from serve.decoder import Decoder
from serve.engine import Batch, Engine, Request
from serve.kv import SlotCache, decode, prefill
from serve.loading import load_model
from serve.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine(load_model("tiny", tiny_model_dir, device="cpu"))


def greedy_by_full_forward(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor(ids)[None])[0, -1].argmax()))
    return ids[len(prompt):]


def prompts(engine, k: int) -> list[list[int]]:
    texts = ["中华人民共和国成立于", "The quick brown fox", "今天的新闻：北京", "In 1949, the", "上海", "A"]
    return [engine.encode(t) for t in texts[:k]]


@pytest.mark.parametrize("padded", [False, True], ids=["exact", "padded"])
def test_cached_decode_logits_equal_full_forward(engine, padded):
    """padded: dummy rows and a longer key length, as a CUDA graph's shapes have."""
    check_cached_decode(engine.m.model, prompts(engine, 3), padded)  # different lengths


@pytest.mark.parametrize("overrides", [dict(bias=True, n_kv_heads=1, tie_embeddings=False),
                                       dict(n_heads=2, n_kv_heads=2)])
def test_cached_decode_other_shapes(overrides):
    """Biases (fused with their projections), one shared kv head, no GQA at all."""
    from train.model import Transformer
    from train.model_config import from_preset

    torch.manual_seed(0)
    cfg = from_preset("tiny", **{"vocab_size": 300, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                 "max_seq_len": 64, **overrides})
    model = Transformer(cfg).eval()
    with torch.no_grad():  # random biases, so a dropped one would show
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    check_cached_decode(model, [[5, 17, 42, 7, 99], [3, 250], [11, 12, 13]], padded=True)


def check_cached_decode(model, ps: list[list[int]], padded: bool) -> None:
    B, L = len(ps), max(map(len, ps))
    cache = SlotCache(model, rows=B + 2, slots=L + 8)
    ids = torch.tensor([p + [0] * (L - len(p)) for p in ps])
    logits = prefill(model, cache, 0, ids, torch.tensor([len(p) for p in ps]))
    seqs = [list(p) for p in ps]
    for _ in range(4):
        with torch.no_grad():
            for i, s in enumerate(seqs):
                full = model(torch.tensor(s)[None])[0, -1].float()
                torch.testing.assert_close(logits[i], full, rtol=1e-4, atol=1e-4)
        nxt = logits.argmax(-1)
        positions = [len(s) for s in seqs]
        for i, s in enumerate(seqs):
            s.append(int(nxt[i]))
        tokens, pos, keys = nxt.tolist(), positions, max(positions) + 1
        if padded:  # dummy token 0 at slot 0 of the spare rows; keys up to the cache's end
            tokens, pos, keys = tokens + [0, 0], pos + [0, 0], cache.slots
        logits = decode(model, cache, torch.tensor(tokens), torch.tensor(pos), keys)[:B]


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_batched_generation_equals_full_forward_greedy(engine, static):
    ps = prompts(engine, 6)  # 6 rows: static shapes run 8, two of them dummies
    eng = Engine(engine.m, static_shapes=static)
    results = eng.generate([Request(p, SamplingParams(max_tokens=12, temperature=0, valid_utf8=False)) for p in ps])
    for p, res in zip(ps, results):  # the raw model's argmax (no UTF-8 guard) at every step
        assert res.output_ids == greedy_by_full_forward(engine.m.model, p, 12)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_requests_joining_a_running_batch_decode_as_alone(engine, static):
    """Rows join a running batch and leave it at different steps. The first row leaves
    first, so a later row moves into its cache row; the cache starts too small and
    grows (new rows, more slots) while sequences are running."""
    ps = prompts(engine, 4)
    ps[1] = ps[1] + ps[2] + ps[0]  # a long one, so the slots must grow
    budgets = [4, 12, 8, 10]
    alone = [engine.generate([Request(p, SamplingParams(max_tokens=n, temperature=0))])[0].output_ids
             for p, n in zip(ps, budgets)]
    cache = SlotCache(engine.m.model, rows=1, slots=8)
    batch = Batch(cache, Decoder(engine.m.model, cache, static=static))
    got: dict[int, list[int]] = {}
    cb = lambda i: (lambda res: got.__setitem__(i, res.output_ids))  # noqa: E731
    engine.prefill(batch, [Request(ps[0], SamplingParams(max_tokens=budgets[0], temperature=0))], [cb(0)])
    engine.step(batch)
    engine.step(batch)  # two tokens in, the others arrive
    engine.prefill(batch, [Request(p, SamplingParams(max_tokens=n, temperature=0))
                           for p, n in zip(ps[1:], budgets[1:])], [cb(1), cb(2), cb(3)])
    versions, moved = {cache.version}, False
    while batch:
        first = batch.seqs[0]
        engine.step(batch)
        versions.add(cache.version)
        moved |= bool(batch) and batch.seqs[0] is not first
        for seq, length in zip(batch.seqs, batch.lengths):  # each row holds its own tokens
            assert length == len(seq.res.prompt_ids) + len(seq.res.output_ids)  # all fed
    assert got == dict(enumerate(alone))
    assert moved and len(versions) > 1  # a row moved, and the cache grew mid-decoding


def test_warm_up_steps_leave_no_trace(engine):
    """The serving loop first runs every (rows, key length) shape on dummy tokens (on a
    GPU: captures the graphs), writing into rows sequences will own later."""
    ps = prompts(engine, 3)
    alone = [engine.generate([Request(p, SamplingParams(max_tokens=8, temperature=0))])[0].output_ids for p in ps]
    eng = Engine(engine.m, static_shapes=True)
    batch = eng.new_batch(rows=4)
    batch.decoder.warm_up()
    got: dict[int, list[int]] = {}
    eng.prefill(batch, [Request(p, SamplingParams(max_tokens=8, temperature=0)) for p in ps],
                [(lambda i: lambda res: got.__setitem__(i, res.output_ids))(i) for i in range(3)])
    while batch:
        eng.step(batch)
    assert got == dict(enumerate(alone))


def test_prompt_beyond_the_context_is_a_clear_error(engine):
    ctx = engine.context
    batch = engine.new_batch()
    with pytest.raises(ValueError, match="context"):
        engine.prefill(batch, [Request([5] * (ctx - 3), SamplingParams(max_tokens=4))], [print])
    assert len(batch) == 0  # nothing was half-added


def test_cuda_graphs_asked_for_off_a_gpu_is_a_clear_error(engine):
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        Engine(engine.m, cuda_graphs=True)


def test_scoring_only_requests_free_their_rows_at_prefill(engine):
    """max_tokens 0 (echo/score) rows finish at prefill, between generating ones: a
    later row moves into a freed one and still decodes as alone."""
    ps = prompts(engine, 4)
    params = [SamplingParams(max_tokens=n, temperature=0, logprobs=1) for n in (0, 6, 0, 5)]
    reqs = [Request(p, sp, prompt_logprobs=True) for p, sp in zip(ps, params)]
    together = engine.generate(reqs)
    for req, res in zip(reqs, together):
        alone = engine.generate([req])[0]
        assert res.output_ids == alone.output_ids and len(res.output_ids) == req.params.max_tokens
        assert [e and e.logprob for e in res.prompt_logprobs] == pytest.approx(
            [e and e.logprob for e in alone.prompt_logprobs], abs=1e-5)


def test_seeded_requests_draw_from_their_own_stream_whatever_the_batch(engine, monkeypatch):
    """A seeded request's random numbers are the same alone and among greedy, unseeded
    and top-k/top-p requests. (Its tokens then match too, unless other rows change the
    float rounding of its logits, which batched kernels do not promise to keep: so the
    draws are compared, not the tokens.)"""
    import serve.engine as engine_module

    draws: dict[int, list[float]] = {}

    def recording_sample(logits, params, uniforms):
        for p, u in zip(params, uniforms):
            draws.setdefault(id(p), []).append(u)
        return real_sample(logits, params, uniforms)

    real_sample = engine_module.sample
    monkeypatch.setattr(engine_module, "sample", recording_sample)
    ps = prompts(engine, 5)
    seeded = [SamplingParams(max_tokens=10, temperature=1.0, seed=11),
              SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=12),
              SamplingParams(max_tokens=10, temperature=1.2, top_k=20, seed=13)]
    others = [SamplingParams(max_tokens=7, temperature=0), SamplingParams(max_tokens=4, temperature=1.0)]
    alone = []
    for p, sp in zip(ps, seeded):
        engine.generate([Request(p, sp)])
        alone.append(draws.pop(id(sp)))
    engine.generate([Request(p, sp) for p, sp in zip(ps, seeded + others)])
    mixed = [draws[id(sp)] for sp in seeded]
    assert all(len(a) >= 5 for a in alone)
    assert [m[:len(a)] for m, a in zip(mixed, alone)] == [a[:len(m)] for m, a in zip(mixed, alone)]
    assert len({a[0] for a in alone}) == 3  # different seeds, different streams


def byte_tokens(engine, text: str) -> list[int]:
    """text as one byte-level token per UTF-8 byte (GPT-2's byte-to-character map), so
    every Chinese character spans three tokens."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    char = {b: chr(b) for b in printable}
    char.update({b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in printable)})
    ids = [engine.m.tokenizer.token_to_id(char[b]) for b in text.encode("utf-8")]
    assert None not in ids
    return ids


def test_text_decoded_a_few_tokens_at_a_time_equals_the_whole_decode(engine):
    """Streaming and stop strings detokenize incrementally: with Chinese characters
    split over three tokens each, a chunk must wait for the token that completes one."""
    import random as rnd

    from serve.engine import Result, _Seq

    text = "新华社北京电 The quick brown fox, 中文！ends"
    ids = byte_tokens(engine, text)
    chunks: list[str] = []
    req = Request([1], SamplingParams(max_tokens=len(ids), stop=("never",)), on_text=chunks.append)
    seq = _Seq(req, Result([1], [], "", "length"), lambda res: None, rnd.Random(0), None)
    for i, tok in enumerate(ids):
        finished = engine._advance(seq, tok)
        assert "\ufffd" not in seq.res.text and text.startswith(seq.res.text)
        engine._stream(seq, final=finished)
    assert finished and seq.res.text == "".join(chunks) == text


def test_stop_strings_and_streams_on_generated_text(engine):
    for p in prompts(engine, 6):
        chunks: list[str] = []
        req = Request(p, SamplingParams(max_tokens=40, temperature=1.0, seed=5), on_text=chunks.append)
        res = engine.generate([req])[0]
        assert "".join(chunks) == res.text == engine.decode(res.output_ids)
    whole = engine.generate([Request(prompts(engine, 1)[0], SamplingParams(max_tokens=30, temperature=0))])[0].text
    stop = whole[12:15]
    cut = engine.generate([Request(prompts(engine, 1)[0], SamplingParams(max_tokens=30, temperature=0,
                                                                          stop=(stop,)))])[0]
    assert cut.finish_reason == "stop" and cut.text == whole[:whole.find(stop)]


def test_engine_equals_transformers_on_the_export(engine, tiny_model_dir):
    """The engine decodes with the trained model's own forward (one implementation for
    training and serving). Checked against an independent one: transformers' Llama on
    the same export gives the same logits at every cached step (within 1e-4) and the
    same greedy tokens."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir / "hf"), dtype=torch.float32).eval()
    ps = prompts(engine, 4)
    model = engine.m.model
    cache = SlotCache(model, rows=len(ps), slots=64)
    T = max(map(len, ps))
    ids = torch.zeros(len(ps), T, dtype=torch.long)
    for i, p in enumerate(ps):
        ids[i, :len(p)] = torch.tensor(p)
    logits = prefill(model, cache, 0, ids, torch.tensor([len(p) for p in ps]))
    seqs = [list(p) for p in ps]
    with torch.no_grad():
        for _ in range(10):
            for i, s in enumerate(seqs):
                want = hf(torch.tensor(s)[None]).logits[0, -1]
                assert (logits[i] - want).abs().max().item() < 1e-4
                s.append(int(logits[i].argmax()))
            pos = [len(s) - 1 for s in seqs]
            logits = decode(model, cache, torch.tensor([s[-1] for s in seqs]), torch.tensor(pos), max(pos) + 1)
        for p, s in zip(ps, seqs):
            out = hf.generate(torch.tensor(p)[None], max_new_tokens=10, do_sample=False, pad_token_id=0)
            assert out[0, len(p):].tolist() == s[len(p):]
