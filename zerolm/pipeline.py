"""`zerolm pipeline run PIPELINE.yaml`: every stage in order, in one command.

    workdir: runs/zh_en             # every output below it, unless a stage names its own
    address: null                   # a Ray cluster for every stage: ray://HEAD:10001 (or --address)
    stages:                         # the stages to run, each with its usual config
      data: {read: {inputs: [{path: raw/*.jsonl, source: web}]}}
      tokenizer: {vocab_size: 32000}
      pack: {}
      pretrain: {model: {preset: small}, max_steps: 2000}
      sft: {data: {paths: [sft/*.json]}}
      prefs: {prompts: [sft/*.json]}
      dpo: {}
      eval: {task: bpb}
      serve: {models: {chat: dpo}, port: 8000}

Stages run in the flow's order (STAGE_ORDER), whatever order the file lists them in.
The pipeline only wires them together: a stage's inputs default to the outputs of the
stages before it (tokenizer and pack read the clean corpus, pretrain the tokens, sft
starts from pretrain, dpo from sft and reads prefs' pairs, eval the last model); any
key a stage gives itself wins. Each stage keeps its own protocol (zerolm/stage.py):
one that finished with the same config is skipped, one cut off restarts or resumes
cleanly. Eval is a stage too (EVAL_DIR/_SUCCESS), so a rerun does not rewrite its
report. `--from` / `--until` run a part of the flow; earlier stages must be finished.
At the end a report lists every stage: what it did, how long it took, its numbers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import yaml
from pydantic import Field, ValidationError

from zerolm.config import (StrictModel, config_hash, deep_merge, format_validation_error, load_yaml,
                           parse_override, set_path)
from zerolm.errors import UserError
from zerolm.stage import OWNER, SUCCESS, StageDir, write_json_atomic

TRAIN_STAGES = ("pretrain", "sft", "reward", "dpo", "grpo", "ppo")
STAGE_ORDER = ("data", "tokenizer", "pack", "pretrain", "sft", "reward", "prefs", "dpo", "grpo", "ppo", "eval",
               "serve")
TITLES = {  # what each stage is, as the CLI says it
    "data": "zerolm data run (read, normalize, filter, exact + near dedup, write)",
    "tokenizer": "zerolm tokenizer train (byte-level BPE)",
    "pack": "zerolm pack (tokenize, train/val per source)",
    "pretrain": "zerolm train pretrain", "sft": "zerolm train sft (chat template, answers only)",
    "reward": "zerolm train reward", "prefs": "zerolm data prefs (dataset answers vs the model's samples)",
    "dpo": "zerolm train dpo (frozen reference)", "grpo": "zerolm train grpo", "ppo": "zerolm train ppo",
    "eval": "zerolm eval",
}
MODEL_STAGES = ("ppo", "grpo", "dpo", "sft", "pretrain")  # the last model of a pipeline: the first present


class PipelineConfig(StrictModel):
    workdir: str = "zerolm-pipeline"
    address: Optional[str] = None
    stages: dict[str, dict] = Field(default_factory=dict)


def load_pipeline(path: str | None, overrides: list[str] = (), **top) -> PipelineConfig:
    """PIPELINE.yaml < `--set a.b=c` overrides < top-level flags (workdir, address)."""
    data = load_yaml(path) if path else {}
    for item in overrides:
        set_path(data, *parse_override(item))
    data.update({k: v for k, v in top.items() if v is not None})
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"pipeline config error: {format_validation_error(exc)}") from None
    unknown = [name for name in cfg.stages if name not in STAGE_ORDER]
    if unknown:
        raise UserError(f"pipeline: unknown stage(s) {unknown}; stages, in order: {', '.join(STAGE_ORDER)}")
    if not cfg.stages:
        raise UserError("pipeline: no stages (give a `stages:` mapping)")
    for name, stage_cfg in wired(cfg).items():  # every stage's config checked before the first one runs
        if name == "serve" and set(stage_cfg) - {"models", "port"}:
            raise UserError(f"pipeline stage serve: unknown key(s) {sorted(set(stage_cfg) - {'models', 'port'})}")
        if name == "eval" and not (stage_cfg.get("model") and stage_cfg.get("data")):
            raise UserError("pipeline stage eval: needs model and data (or a training stage and pack before it)")
        if name in CONFIGS:
            try:
                CONFIGS[name]().model_validate(stage_cfg)
            except ValidationError as exc:
                raise UserError(f"pipeline stage {name}: config error: {format_validation_error(exc)}") from None
    return cfg


def _config_class(module: str, name: str):
    return lambda: getattr(__import__(module, fromlist=[name]), name)


def _train_config(name: str):
    def get():
        from train.stages import get_stage

        return get_stage(name).config
    return get


CONFIGS = {"data": _config_class("dataproc.config", "DataRunConfig"),
           "tokenizer": _config_class("dataproc.tokenizer", "TokenizerConfig"),
           "pack": _config_class("dataproc.pack", "PackConfig"),
           "prefs": _config_class("train.prefs", "PrefsConfig"),
           **{name: _train_config(name) for name in TRAIN_STAGES}}


DEFAULT_OUTPUTS = {"data": "clean", "tokenizer": "tokenizer", "pack": "tokens", "prefs": "prefs", "eval": "eval",
                   **{name: f"runs/{name}" for name in TRAIN_STAGES}}


def wired(cfg: PipelineConfig) -> dict[str, dict]:
    """Each listed stage's config: the wiring defaults under the stage's own keys. A
    stage's inputs default to the outputs (as configured) of the stages before it."""
    work = Path(cfg.workdir).resolve()
    has = set(cfg.stages)
    out = {name: str(Path(cfg.stages[name].get("output") or work / DEFAULT_OUTPUTS[name]).resolve())
           if name in has else str(work / DEFAULT_OUTPUTS[name]) for name in DEFAULT_OUTPUTS}
    scaling = {"scaling": {"address": cfg.address}} if cfg.address else {}
    chat = out["sft"] if "sft" in has else None
    policy = out["dpo"] if "dpo" in has else chat  # what online RL starts from
    last_model = next((out[name] for name in MODEL_STAGES if name in has), None)
    defaults = {
        "data": {"ray": {"address": cfg.address}},
        "tokenizer": {"input": out["data"]},
        "pack": {"input": out["data"], "tokenizer": out["tokenizer"], "address": cfg.address},
        "pretrain": {"data": {"tokens": out["pack"]}, **scaling},
        "sft": {**({"init_from": out["pretrain"]} if "pretrain" in has else {}), **scaling},
        "reward": {**({"init_from": chat} if chat else {}), **scaling},
        "prefs": {**({"model": chat} if chat else {})},
        "dpo": {**({"init_from": chat} if chat else {}),
                **({"data": {"paths": [str(Path(out["prefs"]) / "pairs" / "*.parquet")]}} if "prefs" in has else {}),
                **scaling},
        "grpo": {**({"init_from": policy} if policy else {}), **scaling},
        "ppo": {**({"init_from": policy} if policy else {}), **({"reward": out["reward"]} if "reward" in has else {}),
                **scaling},
        "eval": {"task": "bpb", "limit": 50, **({"model": last_model} if last_model else {}),
                 **({"data": [out["pack"]]} if "pack" in has else {})},
        "serve": {"port": 8000, "models": {name: name for name in ("pretrain", "dpo") if name in has}},
    }
    for name in DEFAULT_OUTPUTS:
        defaults[name]["output"] = out[name]
    return {name: deep_merge(defaults[name], cfg.stages[name] or {}) for name in STAGE_ORDER if name in cfg.stages}


def select(names: list[str], start: str | None, until: str | None) -> list[str]:
    for flag, name in (("--from", start), ("--until", until)):
        if name is not None and name not in names:
            raise UserError(f"{flag} {name}: not a stage of this pipeline ({', '.join(names)})")
    lo = names.index(start) if start else 0
    hi = names.index(until) + 1 if until else len(names)
    if lo >= hi:
        raise UserError(f"--from {start} comes after --until {until}")
    return names[lo:hi]


def run_pipeline(cfg: PipelineConfig, *, start: str | None = None, until: str | None = None,
                 overwrite: bool = False, echo=print, after: Callable[[str, dict], None] | None = None) -> list[dict]:
    """Run the selected stages in order; returns the report rows (also in WORKDIR/report.json).
    `after(name, result)` runs after each stage (the demo prints its own lines there)."""
    configs = wired(cfg)
    names = select(list(configs), start, until)
    work = Path(cfg.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "configs").mkdir(exist_ok=True)
    rows = []
    for name in names:
        if name == "serve":
            continue  # last, after the report
        stage_cfg = configs[name]
        (work / "configs" / f"{name}.yaml").write_text(  # rerun alone: zerolm ... --config configs/NAME.yaml
            yaml.safe_dump(stage_cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
        echo(f"\n=== {name}: {TITLES[name]} ===")
        out = Path(stage_cfg["output"])
        before = _success_text(out)
        started = time.time()
        result = RUNNERS[name](stage_cfg, overwrite, echo)
        seconds = time.time() - started
        row = {"stage": name, "output": str(out), "seconds": round(seconds, 1),
               "status": "skipped (done)" if before is not None and before == _success_text(out) else "ran",
               **summary(name, result)}
        rows.append(row)
        echo(f"--- {name}: {row['status']} in {seconds:.0f}s")
        if after:
            after(name, result)
    write_json_atomic(work / "report.json", rows)
    echo("\n" + format_report(rows))
    if "serve" in names:
        serve_stage(configs["serve"], {n: configs[n].get("output") for n in configs}, echo)
    return rows


def _success_text(out: Path) -> str | None:
    try:
        return (out / SUCCESS).read_text(encoding="utf-8")
    except OSError:
        return None


# ----------------------------------------------------------------------------- runners
def _data(cfg: dict, overwrite: bool, echo) -> dict:
    from dataproc.config import DataRunConfig
    from dataproc.pipeline import run_data

    return run_data(DataRunConfig.model_validate(cfg), overwrite=overwrite, echo=echo)


def _tokenizer(cfg: dict, overwrite: bool, echo) -> dict:
    from dataproc.tokenizer import TokenizerConfig, train_tokenizer

    return train_tokenizer(TokenizerConfig.model_validate(cfg), overwrite=overwrite, echo=echo)


def _pack(cfg: dict, overwrite: bool, echo) -> dict:
    from dataproc.pack import PackConfig, run_pack

    return run_pack(PackConfig.model_validate(cfg), overwrite=overwrite, echo=echo)


def _prefs(cfg: dict, overwrite: bool, echo) -> dict:
    from train.prefs import PrefsConfig, run_prefs

    return run_prefs(PrefsConfig.model_validate(cfg), overwrite=overwrite, echo=echo) or {}


def _train(name: str):
    def run(cfg: dict, overwrite: bool, echo) -> dict:
        from train.runner import run_stage
        from train.stages import get_stage

        return run_stage(name, get_stage(name).config.model_validate(cfg), overwrite=overwrite, echo=echo)
    return run


def _eval(cfg: dict, overwrite: bool, echo) -> dict:
    """`zerolm eval` as a stage: EVAL_DIR/<task>.json plus _SUCCESS with the hash of the
    eval config and of the model's and data's own _SUCCESS, so a rerun is a no-op."""
    from serve.eval.report import to_markdown, write_report
    from serve.eval.run import run_eval

    cfg = dict(cfg)
    out, model, task, data = Path(cfg.pop("output")), cfg.pop("model", None), cfg.pop("task"), cfg.pop("data", None)
    if not model or not data:
        raise UserError("pipeline eval: needs `model` and `data` (or a training stage and pack in the pipeline)")
    # The model's and the data's own _SUCCESS (None for an HF folder from elsewhere): a
    # retrained model or repacked tokens make this another evaluation.
    inputs = [_success_text(Path(model))] + [_success_text(Path(d)) for d in data]
    stage = StageDir(out, "eval", config_hash({"model": model, "task": task, "data": data, "inputs": inputs, **cfg}))
    report_path = out / f"{task}.json"
    for old in _old_eval_reports(out):  # `zerolm demo` wrote eval/bpb.json before eval had a _SUCCESS
        old.unlink()
    if not stage.begin(overwrite=overwrite):
        echo(f"{out} already holds this evaluation (nothing to do)")
        return json.loads(report_path.read_text(encoding="utf-8"))
    report = run_eval(str(model), task, [str(d) for d in data], **cfg)
    echo(to_markdown(report))
    write_report(report, report_path)
    from zerolm.lineage import describe

    stage.finish(inputs=[describe("model", model)] + [describe("data", d) for d in data])
    return report


def _old_eval_reports(out: Path) -> list[Path]:
    """A folder of nothing but eval reports (JSON with "task" and "model") that no stage
    claims: made by an older zerolm, safe to recompute. Anything else in it keeps the
    stage protocol's refusal (a user's files are never deleted)."""
    if not out.is_dir() or (out / OWNER).exists():
        return []
    entries = list(out.iterdir())
    try:
        if entries and all(p.suffix == ".json" and {"task", "model"} <= set(json.loads(p.read_text("utf-8")))
                           for p in entries):
            return entries
    except (OSError, ValueError, TypeError):
        pass
    return []


RUNNERS = {"data": _data, "tokenizer": _tokenizer, "pack": _pack, "prefs": _prefs, "eval": _eval,
           **{name: _train(name) for name in TRAIN_STAGES}}


def serve_stage(cfg: dict, outputs: dict, echo) -> None:
    """Serve models named by stage (`chat: dpo`) or by path, until Ctrl-C."""
    import ray

    from serve.server import serve

    models = [f"{name}={outputs.get(ref) or ref}" for name, ref in (cfg.get("models") or {}).items()]
    if not models:
        raise UserError("pipeline serve: no models (give serve.models, e.g. {chat: dpo})")
    if ray.is_initialized():
        ray.shutdown()  # the data and training jobs are done: give their cores back
    echo(f"\n=== serve: zerolm serve {' '.join('--model ' + m for m in models)} --port {cfg['port']} ===")
    try:
        serve(models, port=cfg["port"])
    except KeyboardInterrupt:
        pass


# ----------------------------------------------------------------------------- report
def summary(name: str, result: dict) -> dict:
    """The numbers a user looks at first, per stage."""
    result = result or {}
    if name == "data":
        return {"rows_in": result.get("rows_in"), "rows_out": result.get("rows_out"),
                "rejected": result.get("rejected")}
    if name == "tokenizer":
        return {"vocab_size": result.get("vocab_size")}
    if name == "pack":
        totals = result.get("totals") or {}
        return {f"{split}_tokens": v.get("tokens") for split, v in totals.items()}
    if name == "prefs":
        return {k: result.get(k) for k in ("prompts", "pairs_out", "dropped") if k in result}
    if name == "eval":
        overall = result.get("overall") or {}
        return {k: v for k, v in overall.items() if isinstance(v, (int, float))}
    ev = result.get("eval") or {}
    numbers = {"steps": result.get("steps")}
    numbers.update({k: round(v, 4) for k, v in ev.items() if isinstance(v, float) and k.count("/") == 1})
    return {k: v for k, v in numbers.items() if v is not None}


def format_report(rows: list[dict]) -> str:
    lines = [f"{'stage':<10}{'status':<16}{'seconds':>8}  numbers"]
    for row in rows:
        numbers = ", ".join(f"{k} {_fmt(v)}" for k, v in row.items()
                            if k not in ("stage", "output", "seconds", "status"))
        lines.append(f"{row['stage']:<10}{row['status']:<16}{row['seconds']:>8.0f}  {numbers}")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
