"""Valid UTF-8 from a byte-level vocabulary (serve/utf8.py): token bytes read back exactly,
the guard's tables, and sampled completions that never show U+FFFD, with a cut inside a
character at max_tokens reported instead."""

from __future__ import annotations

import pytest

from serve.utf8 import Utf8Guard, _advance, incomplete_tail, token_bytes

TEXT = "新华社北京1月1日电 记者从国务院获悉。It's a test: naïve café, 日本語 and emoji 🙂."


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from serve.loading import load_model

    return load_model("tiny", tiny_model_dir, device="cpu")


def test_token_bytes_spell_the_decoded_text(loaded):
    pieces = token_bytes(loaded.tokenizer)
    ids = loaded.tokenizer.encode(TEXT, add_special_tokens=False).ids
    assert b"".join(pieces[i] for i in ids).decode("utf-8") == loaded.tokenizer.decode(ids) == TEXT
    specials = [i for t, i in loaded.tokenizer.get_vocab(with_added_tokens=True).items() if t.startswith("<|")]
    assert specials and all(pieces[i] is None for i in specials)


def test_state_machine_and_tables(loaded):
    assert _advance(0, "中".encode()[:2]) == 1 and _advance(1, "中".encode()[2:]) == 0
    assert _advance(0, b"\x80") is None and _advance(1, b"a") is None and _advance(0, b"\xff") is None
    assert incomplete_tail("ab中".encode()[:-1]) == 2 and incomplete_tail("ab中".encode()) == 0
    pieces = token_bytes(loaded.tokenizer)
    guard = Utf8Guard(pieces, loaded.config.vocab_size, loaded.device)
    allowed = ~guard.masks
    for i, data in enumerate(pieces):
        if data is None:
            assert allowed[0, i] and not allowed[1:, i].any()  # specials only between characters
        elif data[0] & 0xC0 == 0x80:
            assert not allowed[0, i]  # a token opening with a continuation byte cannot start a character
    partial = next(i for i, d in enumerate(pieces) if d and len(d) == 2 and 0xE0 <= d[0] <= 0xEF)
    assert allowed[0, partial] and guard.next_state[0, partial] == 1
    assert all(pieces[i][0] & 0xC0 == 0x80 for i in allowed[1].nonzero().flatten().tolist())
    assert guard.state_after([partial]) == 1 and guard.tail_bytes([partial]) == 2


def test_sampled_completions_decode_whole(loaded):
    from serve.engine import Engine, Request
    from serve.sampling import SamplingParams

    engine = Engine(loaded)
    prompts = ["新华社北京电", "今天", "The", "人民日报记者", "经济", "我们"] * 8
    reqs = [Request(engine.encode(p), SamplingParams(max_tokens=1 + i % 8, temperature=1.5, seed=i))
            for i, p in enumerate(prompts)]
    results = engine.generate(reqs)
    for res in results:
        assert "\ufffd" not in res.text, res.text
        whole = engine.decode(res.output_ids)
        if res.incomplete_bytes:  # cut at max_tokens inside a character: reported, not shown as U+FFFD
            assert res.finish_reason == "length" and whole == res.text + "\ufffd"
        else:
            assert whole == res.text
    # a prompt of token ids that ends inside a character: the first token completes it
    pieces = token_bytes(loaded.tokenizer)
    partial = next(i for i, d in enumerate(pieces) if d and len(d) == 2 and d[0] == 0xE4)
    for seed in range(4):
        res = engine.generate([Request(engine.encode("新华社") + [partial], SamplingParams(max_tokens=1, seed=seed))])[0]
        assert _advance(1, pieces[res.output_ids[0]]) is not None  # it starts with the missing byte
