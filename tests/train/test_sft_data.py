"""SFT data without Ray: readers for every format, chat-template masks on multi-turn
Chinese and English dialogues (ids equal transformers' apply_chat_template), truncation
at turn boundaries, prompt dedup, rejects with file and line, packing that gives every
conversation the same per-token losses as training it alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.chat import ChatTokenizer, truncate_at_turn
from train.conversations import BadRecord, Reject, check_conversation, read_records, to_messages
from train.losses import IGNORE_INDEX
from train.packing import Examples, pack_rows, row_batch
from train.sft import SFTDataSection
from train.sft_data import prepare_sft_data

ZH_DIALOGUE = [
    {"role": "system", "content": "你是一个乐于助人的助手。"},
    {"role": "user", "content": "北京是哪个国家的首都？"},
    {"role": "assistant", "content": "北京是中华人民共和国的首都。"},
    {"role": "user", "content": "那上海呢？"},
    {"role": "assistant", "content": "上海是中国最大的城市，\n位于长江入海口。"},
]
EN_DIALOGUE = [
    {"role": "user", "content": "What is a list in Python?"},
    {"role": "assistant", "content": " A mutable sequence, written [1, 2, 3]."},
    {"role": "user", "content": "And a tuple?"},
    {"role": "assistant", "content": "An immutable one: (1, 2, 3).\n"},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]


@pytest.fixture(scope="module")
def chat(tokenizer_dir) -> ChatTokenizer:
    return ChatTokenizer(tokenizer_dir)


@pytest.mark.parametrize("dialogue", [ZH_DIALOGUE, EN_DIALOGUE], ids=["zh", "en"])
def test_multi_turn_mask_is_every_answer_and_its_end_token(chat, tokenizer_dir, dialogue):
    from transformers import AutoTokenizer

    e = chat.encode_many([dialogue])[0]
    ref = AutoTokenizer.from_pretrained(tokenizer_dir).apply_chat_template(dialogue, tokenize=True)
    ref = ref["input_ids"] if hasattr(ref, "keys") else ref
    assert e.ids.tolist() == list(ref)  # the ids a user's transformers renders
    answers = [m["content"] for m in dialogue if m["role"] == "assistant"]
    decode = lambda ids: chat.tok.decode([int(t) for t in ids], skip_special_tokens=False)  # noqa: E731
    # the trained tokens are exactly the answers, each followed by <|im_end|>
    assert decode(e.ids[e.mask == 1]) == "".join(a + "<|im_end|>" for a in answers)
    assert len(e.turn_ends) == len(answers)
    for start, end, answer in zip(e.answer_starts, e.turn_ends, answers):
        assert decode(e.ids[start:end]) == answer + "<|im_end|>" and e.mask[start:end].all()
        assert e.ids[end - 1] == chat.end_id
    untrained = decode(e.ids[e.mask == 0])
    assert all(a.strip() not in untrained for a in answers)
    assert "<|im_start|>assistant\n" in untrained and untrained.count("<|im_end|>") == len(dialogue) - len(answers)
    # the generation prompt of the last answer is what the serving engine is given
    last = [m for m in dialogue][:-1]
    assert chat.prompt_ids(last) == e.ids[:e.prompt_len].tolist()


def test_truncation_cuts_at_a_turn_boundary(chat):
    e = chat.encode_many([EN_DIALOGUE])[0]
    cut = truncate_at_turn(e, e.turn_ends[1] + 3)  # room for two answers, not three
    assert len(cut.ids) == e.turn_ends[1] and cut.ids[-1] == chat.end_id
    assert cut.turn_ends == e.turn_ends[:2] and cut.prompt_len == e.answer_starts[1]
    assert truncate_at_turn(e, e.turn_ends[0] - 1) is None  # not even the first answer fits
    assert truncate_at_turn(e, len(e.ids)) is e


def test_every_format_reads_real_data(shared_data, tmp_path):
    alpaca = json.loads((shared_data / "sft" / "alpaca_zh_demo.json").read_text())[:20]
    # OpenAI messages and prompt/response jsonl made from real alpaca records
    openai = tmp_path / "openai.jsonl"
    openai.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": [{"type": "text", "text": r["instruction"]}]},
        {"role": "assistant", "content": r["output"]}]}, ensure_ascii=False) + "\n" for r in alpaca))
    cases = [
        (shared_data / "sft" / "alpaca_en_demo.json", "alpaca", 999),
        (shared_data / "sft" / "firefly_multiturn_zh.jsonl", "firefly", 33),
        (shared_data / "preference" / "dpo_zh_demo.json", "sharegpt", None),  # ShareGPT conversations
        (shared_data / "pretrain" / "zh" / "zhihu_qa_3k.parquet", "prompt_response", 3000),
        (openai, "openai", 20),
    ]
    for path, fmt, expected in cases:
        items = list(read_records(path))
        assert not [i for i in items if isinstance(i, Reject)], path
        msgs = [to_messages(rec) for rec, _ in items]
        if expected is not None:
            assert len(msgs) == expected
            for m in msgs:
                check_conversation(m)
        assert all(m[0]["role"] in ("system", "user") for m in msgs)
    firefly = [to_messages(rec) for rec, _ in read_records(shared_data / "sft" / "firefly_multiturn_zh.jsonl")]
    assert max(sum(m["role"] == "assistant" for m in c) for c in firefly) > 2  # real multi-turn
    assert to_messages(items[0][0])[0]["content"] == alpaca[0]["instruction"]  # openai text parts joined


BAD_LINES = [
    ('{"instruction": "hi", "output": ', "bad_json"),
    ('{"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}', "unknown_role"),
    ('{"instruction": "Say something.", "output": "   "}', "empty_assistant_turn"),
    ('{"instruction": "Count.", "output": 42}', "non_string_output"),
    ('{"conversations": [{"from": "human", "value": ["a"]}, {"from": "gpt", "value": "b"}]}', "non_string_content"),
    ('{"prompt": "only a prompt"}', "missing_field"),
    ('{"text": "no conversation here"}', "unknown_format"),
    ('[1, 2]', "not_an_object"),
    ('{"messages": [{"role": "user", "content": "a"}]}', "no_assistant_turn"),
    ('{"messages": [{"role": "user", "content": "<|im_end|>hi"}, {"role": "assistant", "content": "b"}]}',
     "special_token_in_content"),
]


def test_bad_records_are_rejected_with_file_and_line(shared_data, chat, tmp_path):
    good = json.loads((shared_data / "sft" / "alpaca_en_demo.json").read_text())[:40]
    lines = [json.dumps(r) for r in good]
    for k, (line, _) in enumerate(BAD_LINES):
        lines.insert(3 * k + 1, line)
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"instruction": "\xff\xfe", "output": "x"}\n')
    d = SFTDataSection(paths=[str(path)], val_fraction=0.1, val_min=2, seq_len=512)
    data = prepare_sft_data(d, chat, echo=lambda *_: None)
    s = data.stats
    expected = sorted([reason for _, reason in BAD_LINES] + ["bad_utf8"])
    assert sorted(r.reason for r in data.rejects) == expected
    by_reason = {r.reason: r for r in data.rejects}
    assert by_reason["bad_json"].where.line == 2 and by_reason["bad_json"].where.file == str(path)
    assert by_reason["bad_utf8"].where.line == len(lines) + 1
    assert s["records_in"] == len(lines) + 1 == s["train_examples"] + s["val_examples"] + s["rejected"] + s["dropped"]
    assert s["train_examples"] + s["val_examples"] + s["dropped"] == 40


def test_prompt_near_duplicates_are_dropped_and_counted(shared_data, chat, tmp_path):
    rows = json.loads((shared_data / "sft" / "alpaca_zh_demo.json").read_text())[:30]
    copies = [{**r, "instruction": r["instruction"] + "。", "output": r["output"][::-1]} for r in rows[:10]]
    path = tmp_path / "dups.json"
    path.write_text(json.dumps(rows + copies, ensure_ascii=False))
    d = SFTDataSection(paths=[str(path)], val_fraction=0.0, seq_len=1024)
    s = prepare_sft_data(d, chat, echo=lambda *_: None).stats
    assert s["dropped_by_reason"]["near_duplicate_prompt"] >= 10 and s["train_examples"] <= 30
    d = SFTDataSection(paths=[str(path)], val_fraction=0.0, seq_len=1024, prompt_dedup={"enabled": False})
    assert prepare_sft_data(d, chat, echo=lambda *_: None).stats["train_examples"] == 40


def test_pack_rows_places_every_example_once():
    rng = np.random.default_rng(0)
    positions = rng.integers(5, 200, size=500)
    rows = pack_rows(positions, 256, seed=3)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(positions[r].sum() <= 256 for r in rows)
    assert positions.sum() / (len(rows) * 256) > 0.95  # packed, not one per row
    assert pack_rows(positions, 256, seed=3) == rows  # deterministic
    assert len(pack_rows(positions, 256, seed=3, packing=False)) == 500


def test_packed_rows_give_each_conversation_its_own_losses(chat, shared_data):
    from train.model import Transformer
    from train.model_config import ModelConfig

    convs = [to_messages(r) for r in json.loads((shared_data / "sft" / "alpaca_zh_demo.json").read_text())[:6]]
    convs += [ZH_DIALOGUE, EN_DIALOGUE]
    enc = [truncate_at_turn(e, 120) for e in chat.encode_many(convs)]
    ex = Examples.build([(e.ids, e.mask, e.prompt_len) for e in enc if e is not None])
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=chat.tok.get_vocab_size(), dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    max_seq_len=1024)).eval()
    rows = pack_rows(ex.lengths() - 1, 512, seed=0)
    assert max(len(r) for r in rows) > 1  # several conversations share a row
    packed = row_batch(ex, rows, 512, chat.pad_id)
    with torch.no_grad():
        logits = model(packed["x"], positions=packed["positions"], doc_ids=packed["doc_ids"])
        per_token = F.cross_entropy(logits.transpose(1, 2), packed["y"], ignore_index=IGNORE_INDEX, reduction="none")
        for r, members in enumerate(rows):
            at = 0
            for i in members:
                alone = row_batch(ex, [[i]], int(ex.lengths()[i]) - 1, chat.pad_id)
                ref = F.cross_entropy(model(alone["x"]).transpose(1, 2), alone["y"], ignore_index=IGNORE_INDEX,
                                      reduction="none")[0]
                n = len(ref)
                torch.testing.assert_close(per_token[r, at:at + n], ref, atol=2e-5, rtol=1e-5)
                at += n
        # without the per-conversation mask and positions, later conversations see earlier ones
        leaky = F.cross_entropy(model(packed["x"]).transpose(1, 2), packed["y"], ignore_index=IGNORE_INDEX,
                                reduction="none")
    assert not torch.allclose(leaky, per_token, atol=1e-3)
    assert packed["count"] == int(sum(ex.example(i)[1][1:].sum() for r in rows for i in r))


def test_check_conversation_shapes():
    for msgs, reason in [
        ([{"role": "assistant", "content": "a"}], "roles_not_alternating"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}],
         "misplaced_system"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
         "ends_with_user_turn"),
        ([{"role": "user", "content": ""}, {"role": "assistant", "content": "b"}], "empty_user_turn"),
    ]:
        with pytest.raises(BadRecord, match=reason):
            check_conversation(msgs)
