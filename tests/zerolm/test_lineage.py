"""`zerolm lineage`: a chat run's folder leads back, stage by stage, to the raw files it
was made from, each finished output recording its inputs, config hash and versions."""

from __future__ import annotations

import json
import subprocess
import sys

from zerolm.lineage import from_lineage


def lineage(path, *flags):
    r = subprocess.run([sys.executable, "-m", "zerolm", "lineage", str(path), *flags], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def stages_below(node, out=None):
    out = [] if out is None else out
    for rec in node.get("inputs", []):
        if "upstream" in rec:
            out.append((rec["role"], rec["upstream"].get("stage"), rec["upstream"]["path"]))
            stages_below(rec["upstream"], out)
    return out


def raw_records(node, out=None):
    out = [] if out is None else out
    for rec in node.get("inputs", []):
        if "upstream" in rec:
            raw_records(rec["upstream"], out)
        else:
            out.append(rec)
    return out


def test_a_chat_run_leads_back_to_the_raw_files(sft_model_dir, tiny_model_dir, tokens_dir, tokenizer_dir,
                                                clean_corpus, shared_data):
    tree = json.loads(lineage(sft_model_dir / "hf", "--json"))  # the hf/ export stands for its run
    assert tree["stage"] == "sft" and tree["path"] == str(sft_model_dir.resolve())
    assert tree["versions"]["zerolm"] and tree["versions"]["torch"]
    below = stages_below(tree)
    assert ("init", "pretrain", str(tiny_model_dir.resolve())) in below
    assert ("tokens", "pack", str(tokens_dir.resolve())) in below
    assert ("tokenizer", "tokenizer", str(tokenizer_dir.resolve())) in below
    assert ("clean", "data", str(clean_corpus.resolve())) in below
    files = {rec["path"]: rec for rec in raw_records(tree)}
    # the SFT data files, with their content hash, and the corpus files the clean stage read
    sft_file = shared_data / "sft" / "identity.json"
    assert files[str(sft_file.resolve())]["sha256"] and files[str(sft_file.resolve())]["role"] == "data"
    people = (shared_data / "pretrain" / "zh" / "peoples_daily_199801.txt").resolve()
    assert files[str(people)]["role"] == "raw" and files[str(people)]["bytes"] == people.stat().st_size

    text = lineage(sft_model_dir)
    assert text.splitlines()[0].startswith(f"{sft_model_dir.resolve()}  [sft ")
    assert "(shown above)" in text  # the clean corpus, reached through pack and through the tokenizer
    assert str(people) in text


def test_unfinished_and_foreign_folders(tmp_path):
    assert "no _SUCCESS" in lineage(tmp_path)
    r = subprocess.run([sys.executable, "-m", "zerolm", "lineage", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "is not a folder" in r.stderr


def test_inputs_are_found_in_any_lineage_shape(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text("{}\n")
    records = from_lineage({"init": {"path": str(tmp_path), "model_dir": str(tmp_path / "hf")},
                            "data": [str(f)], "note": "not/a/path", "prompts": [{"path": str(f), "sha256": "ab"}]})
    assert [(r["role"], r["path"]) for r in records] == [("init", str(tmp_path)), ("data", str(f)),
                                                         ("prompts", str(f))]
    assert records[1]["bytes"] == 3 and records[2]["sha256"] == "ab"
