"""`zerolm data prefs`: preference pairs from an SFT model.

    zerolm data prefs --model SFT_RUN --prompts FILE_OR_GLOB... --output DIR [--reward RM_RUN]

For every conversation in the prompt files (any SFT format), the dataset's final answer
is `chosen` and answers sampled from the SFT model through the serving engine
(batched, each from its own seeded stream) are `rejected`. A candidate pair is dropped
(and counted) when the sample equals the answer, when the sample does not end its turn
within `max_new_tokens`, or when a side is longer than `max_tokens`; with `--reward`,
when the reward model does not score the answer above the sample. Output:
DIR/pairs/part-*.parquet (prompt messages, chosen, rejected, where it came from, the
seed, scores) that `zerolm train reward|dpo` read as they are, stats.json,
rejects.jsonl, progress/ (drop counts per part), _SUCCESS. Parts are written one chunk of prompts at a time and renamed
into place, so an interrupted run continues with the next chunk and gives the same
pairs.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Literal, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from train.conversations import FORMATS, Reject, check_conversation, parse_files, to_messages
from train.sft_data import file_digest
from zerolm.config import StrictModel, config_hash
from zerolm.errors import UserError
from zerolm.lineage import describe, from_lineage
from zerolm.stage import StageDir, write_json_atomic

STAGE = "prefs"
SCHEMA = pa.schema([
    ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("chosen", pa.string()), ("rejected", pa.string()), ("file", pa.string()), ("line", pa.int64()),
    ("row", pa.int64()), ("sample", pa.int32()), ("seed", pa.int64()),
    ("chosen_score", pa.float64()), ("rejected_score", pa.float64()),
])


class PrefsConfig(StrictModel):
    model: str = ""  # the SFT run (or HF folder) that samples the rejected answers
    prompts: list[str] = Field(default_factory=list)  # conversations: files or globs
    output: str = ""
    format: Literal[FORMATS] = "auto"  # type: ignore[valid-type]
    samples: int = Field(default=1, ge=1, le=16)  # sampled answers (candidate pairs) per prompt
    temperature: float = Field(default=1.0, gt=0, le=2)
    top_p: float = Field(default=0.95, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    seed: int = 0
    max_new_tokens: int = Field(default=256, ge=1)
    max_tokens: Optional[int] = Field(default=None, ge=8)  # per side, prompt included; None = the model's context
    reward: Optional[str] = None  # a reward-model run: keep pairs it orders like the dataset
    batch: int = Field(default=32, ge=1)  # prompts per engine batch
    chunk: int = Field(default=256, ge=1)  # prompts per output part (the unit of resuming)
    device: str = "auto"


def read_prompts(cfg: PrefsConfig) -> tuple[list[tuple[list[dict], str, object]], list[Reject], int, list[Path]]:
    """[(prompt messages, dataset answer, where)], rejects, records read, files."""
    def parse(record: dict) -> list[dict]:
        msgs = to_messages(record, cfg.format)
        check_conversation(msgs)
        return msgs

    items, rejects, records, files = parse_files(
        cfg.prompts, parse, missing="no prompts: give --prompts FILE_OR_GLOB (conversations in any SFT format)")
    return [(m[:-1], m[-1]["content"], where) for m, where in items], rejects, records, files


def run_prefs(cfg: PrefsConfig, *, overwrite: bool = False, echo=print) -> dict:
    from serve.engine import Engine, Request
    from serve.loading import load_model
    from serve.sampling import SamplingParams
    from train.chat import ChatTokenizer
    from train.weights import find_model_dir, resolve_init

    if not cfg.output:
        raise UserError("no output folder: give --output DIR")
    init = resolve_init(cfg.model)
    scorer = None
    if cfg.reward:
        from train.reward_model import RewardScorer, is_reward_model

        rm_dir = find_model_dir(cfg.reward)
        if not is_reward_model(rm_dir):
            raise UserError(f"--reward {cfg.reward} is not a reward model (train one with `zerolm train reward`)")
    items, rejects, records, files = read_prompts(cfg)
    if not items:
        raise UserError(f"no usable conversation in {', '.join(cfg.prompts)}: {records} records, rejected "
                        f"{dict(Counter(r.reason for r in rejects))}")
    lineage = {"model_sha256": init.sha256, "prompts": [file_digest(f) for f in files],
               "reward": resolve_init(cfg.reward).sha256 if cfg.reward else None}
    out = Path(cfg.output)
    stage = StageDir(out, STAGE, config_hash({"config": cfg.model_dump(mode="json", exclude={"output", "device",
                                                                                            "batch"}),
                                              "inputs": lineage}))
    if stage.is_done() and not overwrite:
        echo(f"{out} already holds these pairs (nothing to do)")
        return json.loads((out / "stats.json").read_text(encoding="utf-8"))
    if not (out / "_ZEROLM_STAGE").exists() or _owner(out) != stage.config_hash or overwrite:
        stage.begin(overwrite=overwrite)  # a new folder, or a half-written one of another config: restart
    (out / "pairs").mkdir(exist_ok=True)
    (out / "progress").mkdir(exist_ok=True)
    loaded = load_model("sft", init.model_dir, device=cfg.device)
    engine = Engine(loaded, max_batch=cfg.batch, cuda_graphs=False)
    chat = ChatTokenizer(init.model_dir)
    if cfg.reward:
        scorer = RewardScorer(rm_dir, device=str(loaded.device))
    limit = min(cfg.max_tokens or loaded.config.max_seq_len, loaded.config.max_seq_len)
    dropped: Counter = Counter()
    for c0 in range(0, len(items), cfg.chunk):
        part = out / "pairs" / f"part-{c0 // cfg.chunk:05d}.parquet"
        counts = out / "progress" / f"{part.stem}.json"  # the part's drop counts (not beside it: pairs/ is parquet only)
        if part.exists() and counts.exists():
            dropped.update(json.loads(counts.read_text(encoding="utf-8")))  # done before an interruption
            continue
        rows, chunk_drops = [], Counter()
        requests, owners = [], []
        for i, (prompt, answer, where) in enumerate(items[c0:c0 + cfg.chunk], start=c0):
            ids = chat.prompt_ids(prompt)
            if len(ids) + cfg.max_new_tokens > loaded.config.max_seq_len:
                chunk_drops["prompt_too_long"] += cfg.samples
                continue
            for k in range(cfg.samples):
                seed = cfg.seed * 1_000_003 + i * cfg.samples + k
                params = SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                        top_k=cfg.top_k, seed=seed, stop_ids=(chat.end_id,))
                requests.append(Request(ids, params))
                owners.append((i, k, seed, len(ids)))
        results = []
        for b0 in range(0, len(requests), cfg.batch):
            results += engine.generate(requests[b0:b0 + cfg.batch])
        for (i, k, seed, n_prompt), res in zip(owners, results):
            prompt, answer, where = items[i]
            sample = res.text
            # + 2: the turn's <|im_end|> and newline, as the pair stages render each side
            answer_tokens = len(chat.tok.encode(answer, add_special_tokens=False).ids) + 2
            reason = ("sample_did_not_end" if res.finish_reason != "stop" else
                      "empty_sample" if not sample.strip() else
                      "identical" if sample.strip() == answer.strip() else
                      "special_token_in_sample" if any(t in sample for t in ("<|im_start|>", "<|endoftext|>")) else
                      "over_length" if max(n_prompt + answer_tokens, n_prompt + len(res.output_ids) + 2) > limit
                      else None)
            if reason:
                chunk_drops[reason] += 1
                continue
            rows.append({"prompt": prompt, "chosen": answer, "rejected": sample, "file": where.file, "line": where.line,
                         "row": where.row, "sample": k, "seed": seed, "chosen_score": None, "rejected_score": None})
        if scorer is not None and rows:
            scores = scorer.score([r["prompt"] + [{"role": "assistant", "content": side}] for r in rows
                                   for side in (r["chosen"], r["rejected"])])
            kept = []
            for j, r in enumerate(rows):
                r["chosen_score"], r["rejected_score"] = scores[2 * j], scores[2 * j + 1]
                if r["chosen_score"] > r["rejected_score"]:
                    kept.append(r)
                else:
                    chunk_drops["reward_model_disagrees"] += 1
            rows = kept
        tmp = part.with_name(part.name + ".tmp")
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp)
        tmp.replace(part)
        write_json_atomic(counts, dict(chunk_drops))
        dropped.update(chunk_drops)
        echo(f"prompts {min(c0 + cfg.chunk, len(items))}/{len(items)}: {sum(dropped.values())} candidates dropped")
    pairs_out = sum(pq.ParquetFile(p).metadata.num_rows for p in sorted((out / "pairs").glob("part-*.parquet")))
    stats = {"records_in": records, "rejected": len(rejects),
             "rejected_by_reason": dict(Counter(r.reason for r in rejects)), "prompts": len(items),
             "candidates": len(items) * cfg.samples, "pairs_out": pairs_out, "dropped": sum(dropped.values()),
             "dropped_by_reason": dict(dropped)}
    if stats["candidates"] != pairs_out + stats["dropped"] or records != len(items) + len(rejects):
        raise RuntimeError(f"prefs accounting does not add up: {stats}")
    with open(out / "rejects.jsonl", "w", encoding="utf-8") as f:
        for r in rejects:
            f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
    write_json_atomic(out / "stats.json", stats)
    inputs = [describe("model", cfg.model), *from_lineage({"prompts": lineage["prompts"]})]
    stage.finish(pairs=pairs_out, inputs=inputs + ([describe("reward", cfg.reward)] if cfg.reward else []))
    return stats


def _owner(out: Path) -> str | None:
    try:
        return json.loads((out / "_ZEROLM_STAGE").read_text(encoding="utf-8")).get("config_hash")
    except (FileNotFoundError, json.JSONDecodeError):
        return None
