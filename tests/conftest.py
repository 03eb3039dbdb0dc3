"""Shared test fixtures: the real data folder and one Ray instance per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ZEROLM_TEST_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            # In CI a skipped suite would read as green: missing data is a failure there.
            pytest.fail(f"CI: real test data not found at {SHARED_DATA}", pytrace=False)
        pytest.skip(f"real test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (starting Ray costs seconds)."""
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if not ray.is_initialized():
        # address="local": always a private instance. Without it ray.init joins a Ray that
        # another process on the machine started (and then refuses num_cpus).
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


# --------------------------------------------------------------------------- stage outputs
# Built once per session from real text and shared by the tests of later stages.

SMALL_CORPUS = [
    ("pretrain/en/wiki_demo.txt", {"source": "wiki"}),
    ("pretrain/en/c4_demo.jsonl", {"source": "c4"}),
    ("pretrain/zh/cmrc2018_trial.json", {"source": "cmrc", "text_field": "context_text"}),
    ("pretrain/zh/news_sentences.txt", {"source": "news"}),
    ("pretrain/zh/peoples_daily_199801.txt", {"source": "peoples_daily"}),
]


@pytest.fixture(scope="session")
def clean_corpus(ray_session, shared_data, tmp_path_factory) -> Path:
    from dataproc.config import DataRunConfig
    from dataproc.pipeline import run_data

    out = tmp_path_factory.mktemp("stages") / "clean"
    inputs = [{"path": str(shared_data / rel), **opts} for rel, opts in SMALL_CORPUS]
    run_data(DataRunConfig.model_validate({"output": str(out), "read": {"inputs": inputs}}), echo=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(clean_corpus) -> Path:
    from dataproc.tokenizer import TokenizerConfig, train_tokenizer

    out = clean_corpus.parent / "tokenizer"
    train_tokenizer(TokenizerConfig(input=str(clean_corpus), output=str(out), vocab_size=2048,
                                    report_docs_per_source=200), echo=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def tokens_dir(clean_corpus, tokenizer_dir) -> Path:
    from dataproc.pack import PackConfig, run_pack

    out = clean_corpus.parent / "tokens"
    run_pack(PackConfig(input=str(clean_corpus), tokenizer=str(tokenizer_dir), output=str(out), val_fraction=0.05),
             echo=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tokens_dir) -> Path:
    """A small model pretrained briefly on the session's tokens (no Ray: the local
    launcher), exported to RUN/hf/. For serving and evaluation tests."""
    from train.config import PretrainConfig
    from train.runner import run_stage

    out = tokens_dir.parent / "tiny_run"
    cfg = PretrainConfig.model_validate({
        "output": str(out), "max_steps": 60, "log_every": 20,
        "model": {"preset": "tiny", "overrides": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                                  "max_seq_len": 256}},
        "data": {"tokens": str(tokens_dir), "seq_len": 128, "micro_batch_size": 8},
        "optim": {"lr": 3e-3}, "eval": {"every": 0, "max_windows": 4}, "checkpoint": {"every": 0},
        "scaling": {"launcher": "local"}})
    run_stage("pretrain", cfg, echo=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def sft_model_dir(tiny_model_dir, shared_data) -> Path:
    """tiny_model_dir fine-tuned briefly on real SFT data (local launcher): a chat model
    for the preference stages and `zerolm data prefs`."""
    from train.runner import run_stage
    from train.sft import SFTConfig

    out = tiny_model_dir.parent / "tiny_sft"
    cfg = SFTConfig.model_validate({
        "output": str(out), "init_from": str(tiny_model_dir), "max_steps": 40, "log_every": 20,
        "data": {"paths": [str(shared_data / "sft" / "identity.json"), str(shared_data / "sft" / "alpaca_en_demo.json")],
                 "seq_len": 256, "micro_batch_size": 8, "placeholders": {"name": "Zero", "author": "zerolm"}},
        "optim": {"lr": 3e-3}, "eval": {"every": 0, "generate": 0}, "checkpoint": {"every": 0},
        "scaling": {"launcher": "local"}})
    run_stage("sft", cfg, echo=lambda *_: None)
    return out
