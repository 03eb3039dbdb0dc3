"""The `zerolm` command: one entry point, one subcommand per stage.

Each subcommand builds its stage's config (YAML file < CLI flags < --set overrides),
then calls the stage's plain Python function. User errors (bad config, bad paths,
bad input) print one line and exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from zerolm.errors import UserError


def _add_input(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--input", action="append", metavar="[SOURCE=]PATH_OR_GLOB", nargs="+", help=help)


def _add_common(p: argparse.ArgumentParser, *, ray: bool = True) -> None:
    p.add_argument("--config", help="YAML config file for this stage")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set filters.length.min_chars=50 (repeatable)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing finished output made with another config")
    if ray:
        p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else local Ray)")


def _parse_inputs(items: list[str]) -> list[dict]:
    """`--input PATH` or `--input SOURCE=PATH` (a URI's `://` is not mistaken for =)."""
    inputs = []
    for item in items:
        name, sep, path = item.partition("=")
        if sep and "/" not in name and "://" not in name and name:
            inputs.append({"path": path, "source": name})
        else:
            inputs.append({"path": item})
    return inputs


def _data_flags(args) -> dict:
    """The flags `data run` and `data near-dedup` share: --output, --address, --input."""
    flags = {"output": args.output, "ray": {"address": args.address} if args.address else None}
    if args.input:
        flags["read"] = {"inputs": _parse_inputs(args.input)}
    return flags


def cmd_data_run(args) -> int:
    from dataproc.config import DataRunConfig
    from dataproc.pipeline import run_data
    from zerolm.config import build_config

    cfg = build_config(DataRunConfig, config_file=args.config, flags=_data_flags(args), overrides=args.overrides)
    stats = run_data(cfg, overwrite=args.overwrite)
    print(f"\nclean corpus: {cfg.output}/data  rejects: {cfg.output}/rejects  stats: {cfg.output}/stats.json")
    return 0 if stats["rows_out"] > 0 else 1


def cmd_data_near_dedup(args) -> int:
    from dataproc.near_dedup.run import NearDedupRunConfig, run_near_dedup
    from zerolm.config import build_config

    cfg = build_config(NearDedupRunConfig, config_file=args.config, flags=_data_flags(args),
                       overrides=args.overrides)
    stats = run_near_dedup(cfg, overwrite=args.overwrite)
    print(f"\nkept: {cfg.output}/data  removed (audit): {cfg.output}/duplicates  stats: {cfg.output}/stats.json")
    return 0 if stats["rows_out"] > 0 else 1


def cmd_data_prefs(args) -> int:
    from train.prefs import PrefsConfig, run_prefs
    from zerolm.config import build_config

    flags = {"model": args.model, "prompts": args.prompts, "output": args.output, "reward": args.reward}
    cfg = build_config(PrefsConfig, config_file=args.config, flags=flags, overrides=args.overrides)
    stats = run_prefs(cfg, overwrite=args.overwrite)
    print(f"\npairs: {cfg.output}/pairs ({stats['pairs_out']} of {stats['candidates']} candidates; dropped "
          f"{stats['dropped_by_reason']})  stats: {cfg.output}/stats.json")
    return 0 if stats["pairs_out"] else 1


def _flat(groups):
    """`--x a b --x c` (append + nargs) -> [a, b, c]; None stays None."""
    return None if not groups else [item for group in groups for item in group]


def cmd_train_quality(args) -> int:
    from dataproc.quality.classifier import QualityTrainConfig, default_recipe, train_quality
    from zerolm.config import build_config

    flags = {"output": args.output,
             "positive": _parse_inputs(_flat(args.positive)) if args.positive else None,
             "negative": _parse_inputs(_flat(args.negative)) if args.negative else None}
    base = default_recipe(args.default_recipe) if args.default_recipe else None
    cfg = build_config(QualityTrainConfig, config_file=args.config, base=base, flags=flags, overrides=args.overrides)
    train_quality(cfg)
    print(f"\nquality model: {cfg.output}  (report: {cfg.output}.json; use it with --set quality.enabled=true "
          f"--set quality.model={cfg.output})")
    return 0


def cmd_train_langid(args) -> int:
    from dataproc.quality.langid import LangidTrainConfig, train_langid
    from zerolm.config import build_config

    langs = [x.strip() for x in args.languages.split(",") if x.strip()] if args.languages else None
    flags = {"input": args.input, "output": args.output, "languages": langs}
    cfg = build_config(LangidTrainConfig, config_file=args.config, flags=flags, overrides=args.overrides)
    train_langid(cfg)
    print(f"\nlanguage-id model: {cfg.output}  (report: {cfg.output}.json)")
    return 0


def cmd_train_ppl(args) -> int:
    from dataproc.quality.perplexity import PplTrainConfig, default_recipe, train_ppl
    from zerolm.config import build_config

    flags = {"output": args.output, "zh": _parse_inputs(_flat(args.zh)) if args.zh else None,
             "en": _parse_inputs(_flat(args.en)) if args.en else None}
    base = default_recipe(args.default_recipe) if args.default_recipe else None
    cfg = build_config(PplTrainConfig, config_file=args.config, base=base, flags=flags, overrides=args.overrides)
    train_ppl(cfg)
    print(f"\nperplexity model: {cfg.output}  (report: {cfg.output}.json)")
    return 0


def cmd_tokenizer_train(args) -> int:
    from dataproc.tokenizer import TokenizerConfig, train_tokenizer
    from dataproc.tokenizer_report import format_report_table
    from zerolm.config import build_config

    flags = {"input": args.input, "output": args.output, "vocab_size": args.vocab_size}
    cfg = build_config(TokenizerConfig, config_file=args.config, flags=flags, overrides=args.overrides)
    report = train_tokenizer(cfg, overwrite=args.overwrite, show_progress=True)
    print(format_report_table(report))
    print(f"\ntokenizer: {cfg.output}  (transformers.AutoTokenizer.from_pretrained loads it)")
    return 0


def cmd_pack(args) -> int:
    from dataproc.pack import PackConfig, run_pack
    from zerolm.config import build_config

    flags = {"input": args.input, "tokenizer": args.tokenizer, "output": args.output, "address": args.address}
    cfg = build_config(PackConfig, config_file=args.config, flags=flags, overrides=args.overrides)
    run_pack(cfg, overwrite=args.overwrite)
    print(f"\ntokens: {cfg.output}  manifest: {cfg.output}/manifest.json")
    return 0


def cmd_train(args) -> int:
    from train.runner import run_stage
    from train.stages import get_stage
    from zerolm.config import build_config

    stage = get_stage(args.train_command)
    flags = {"output": args.output, "scaling": {"address": args.address} if args.address else None,
             **stage.cli_flags(args)}
    cfg = build_config(stage.config, config_file=args.config, flags=flags, overrides=args.overrides)
    if args.resume:
        from train.checkpoint import latest_checkpoint

        if latest_checkpoint(cfg.output) is None:
            raise UserError(f"--resume: {cfg.output} has no checkpoint to resume from")
    result = run_stage(stage.name, cfg, overwrite=args.overwrite)
    print(f"\nrun: {cfg.output}  checkpoints: {cfg.output}/checkpoints  HF export: {cfg.output}/hf")
    print(f"metrics: {cfg.output}/metrics.jsonl (TensorBoard: tensorboard --logdir {cfg.output}/tb)")
    print(stage.summary(cfg, result))
    return 0


def cmd_serve(args) -> int:
    from serve.server import serve

    serve(args.model or [], host=args.host, port=args.port, api_key=args.api_key, device=args.device,
          dtype=args.dtype, max_batch=args.max_batch, engine_process=not args.engine_thread,
          cuda_graphs=False if args.no_cuda_graphs else None, eval_sets=args.eval_set)
    return 0


def cmd_eval(args) -> int:
    from serve.eval.report import to_markdown, write_report
    from serve.eval.run import run_eval

    subjects = [x.strip() for x in args.subjects.split(",") if x.strip()] if args.subjects else None
    report = run_eval(args.model, args.task, args.data or [], device=args.device, dtype=args.dtype,
                      shots=args.shots, limit=args.limit, subjects=subjects, stride=args.stride,
                      split=args.split, per_file=args.doc_per_file, progress=True,
                      baselines=not args.no_baselines, baseline_train=args.baseline_train)
    print(to_markdown(report))
    if args.output:
        print(f"\nreport: {write_report(report, args.output)}")
    return 0


def _verbose(args) -> None:
    if getattr(args, "verbose", False):
        os.environ["ZEROLM_VERBOSE"] = "1"  # zerolm/ray_env.py: Ray's INFO lines stay on


def cmd_demo(args) -> int:
    from zerolm.demo import run_demo

    _verbose(args)
    run_demo(args.workdir, overwrite=args.overwrite, address=args.address,
             serve_port=None if args.no_serve else args.port, rl=args.rl)
    return 0


def cmd_pipeline_run(args) -> int:
    from zerolm.pipeline import load_pipeline, run_pipeline

    _verbose(args)
    cfg = load_pipeline(args.config, args.overrides, workdir=args.workdir, address=args.address)
    run_pipeline(cfg, start=args.start, until=args.until, overwrite=args.overwrite)
    return 0


def cmd_lineage(args) -> int:
    from zerolm.lineage import chain, format_chain

    if not Path(args.dir).is_dir():
        raise UserError(f"{args.dir} is not a folder")
    tree = chain(args.dir)
    print(json.dumps(tree, indent=2, ensure_ascii=False) if args.json else "\n".join(format_chain(tree)))
    return 0


def cmd_submit(args) -> int:
    from zerolm import submit

    actions = [name for name in ("list", "status", "logs", "stop") if getattr(args, name)]
    if len(actions) > 1 or (actions and args.command):
        raise UserError("give one of --list, --status, --logs, --stop, or a command after --")
    client = submit.connect(args.address, args.token_file)
    if args.list:
        return submit.list_jobs(client)
    if args.status:
        return submit.report_status(client, args.status)
    if args.logs:
        return submit.show_logs(client, args.logs)
    if args.stop:
        return submit.stop_job(client, args.stop)
    return submit.submit_job(client, args.command, working_dir=args.working_dir, wait=not args.no_wait)


def _add_train_stages(train_sub) -> None:
    """One subcommand per registered stage (train/stages.py); importing the stages
    imports torch, so this runs only for `zerolm train ...`."""
    from train.stages import STAGES, get_stage

    for name in STAGES:
        stage = get_stage(name)
        p = train_sub.add_parser(name, help=stage.help)
        stage.add_arguments(p)
        p.add_argument("--output", help="run folder")
        p.add_argument("--resume", action="store_true",
                       help="continue from the last checkpoint (rerunning the same command does too)")
        _add_common(p)
        p.set_defaults(func=cmd_train)


def build_parser(train_stages: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zerolm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="data processing jobs (Ray Data)")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="JOB")
    run = data_sub.add_parser("run", help="clean: read, normalize, filter, dedup, write parquet")
    _add_input(run, "input files: paths, globs (** recurses) or URIs; repeatable")
    run.add_argument("--output", help="output folder (clean corpus)")
    _add_common(run)
    run.set_defaults(func=cmd_data_run)

    nd = data_sub.add_parser("near-dedup", help="near-duplicate removal alone (MinHash-LSH or SimHash)")
    _add_input(nd, "input files: paths, globs or URIs (e.g. DIR/data/*.parquet of a data run); repeatable")
    nd.add_argument("--output", help="output folder: data/ (kept), duplicates/ (audit), stats.json")
    _add_common(nd)
    nd.set_defaults(func=cmd_data_near_dedup)

    pf = data_sub.add_parser("prefs", help="preference pairs: dataset answers (chosen) vs SFT model samples (rejected)")
    pf.add_argument("--model", help="the SFT run (or HF folder) whose sampled answers become the rejected side")
    pf.add_argument("--prompts", nargs="+", action="extend", metavar="FILE_OR_GLOB",
                    help="conversations in any SFT format; the final answer is the chosen side")
    pf.add_argument("--reward", help="a reward-model run: keep only pairs it scores chosen > rejected")
    pf.add_argument("--output", help="output folder: pairs/*.parquet, stats.json, rejects.jsonl")
    _add_common(pf, ray=False)
    pf.set_defaults(func=cmd_data_prefs)

    tq = data_sub.add_parser("train-quality", help="train the fastText quality classifier (high vs low quality)")
    tq.add_argument("--positive", action="append", nargs="+", metavar="[SOURCE=]PATH",
                    help="high-quality text: paths or globs (repeatable)")
    tq.add_argument("--negative", action="append", nargs="+", metavar="[SOURCE=]PATH",
                    help="low-quality text: paths or globs (repeatable)")
    tq.add_argument("--default-recipe", metavar="DATA_DIR",
                    help="the built-in recipe on the shared test data folder (e.g. ../shared/data)")
    tq.add_argument("--output", help="model file to write")
    _add_common(tq, ray=False)
    tq.set_defaults(func=cmd_train_quality)

    tl = data_sub.add_parser("train-langid", help="train the fastText language identifier")
    tl.add_argument("--input", help="folder of <language>.txt files, one sentence per line")
    tl.add_argument("--languages", help="comma-separated subset of the languages (default: all files)")
    tl.add_argument("--output", help="model file to write")
    _add_common(tl, ray=False)
    tl.set_defaults(func=cmd_train_langid)

    tp = data_sub.add_parser("train-ppl", help="train the n-gram perplexity model (zh characters, en words)")
    tp.add_argument("--zh", action="append", nargs="+", metavar="[SOURCE=]PATH", help="Chinese reference text")
    tp.add_argument("--en", action="append", nargs="+", metavar="[SOURCE=]PATH", help="English reference text")
    tp.add_argument("--default-recipe", metavar="DATA_DIR",
                    help="the built-in recipe on the shared test data folder (e.g. ../shared/data)")
    tp.add_argument("--output", help="model file to write")
    _add_common(tp, ray=False)
    tp.set_defaults(func=cmd_train_ppl)

    tok = sub.add_parser("tokenizer", help="tokenizer jobs")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="JOB")
    train_tok = tok_sub.add_parser("train", help="train a byte-level BPE tokenizer on a clean corpus")
    train_tok.add_argument("--input", help="clean corpus folder (output of `zerolm data run`)")
    train_tok.add_argument("--output", help="tokenizer folder to write")
    train_tok.add_argument("--vocab-size", type=int, help="vocabulary size incl. special tokens (default 32000)")
    _add_common(train_tok, ray=False)
    train_tok.set_defaults(func=cmd_tokenizer_train)

    pack = sub.add_parser("pack", help="tokenize a clean corpus into train/val token shards")
    pack.add_argument("--input", help="clean corpus folder")
    pack.add_argument("--tokenizer", help="tokenizer folder")
    pack.add_argument("--output", help="token folder to write")
    _add_common(pack)
    pack.set_defaults(func=cmd_pack)

    train = sub.add_parser("train", help="training stages (Ray Train + DeepSpeed): pretrain, sft, ...")
    train_sub = train.add_subparsers(dest="train_command", required=True, metavar="STAGE")
    if train_stages:
        _add_train_stages(train_sub)

    srv = sub.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API")
    srv.add_argument("--model", action="append", metavar="NAME=DIR",
                     help="a run folder or HF export to serve under NAME (repeatable)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    srv.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    srv.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    srv.add_argument("--max-batch", type=int, default=32, help="requests decoded together")
    srv.add_argument("--eval-set", action="append", metavar="NAME=[TASK:]PATH",
                     help="a local evaluation set that POST /v1/evaluations may name as \"dataset\": a cmmlu, "
                          "ceval or mmlu folder or an arc JSONL file (TASK detected from NAME or the subjects "
                          "when not given); repeatable")
    srv.add_argument("--engine-thread", action="store_true",
                     help="run the model on a thread of the HTTP process instead of its own process "
                          "(slower under load: both share one GIL)")
    srv.add_argument("--no-cuda-graphs", action="store_true",
                     help="on a GPU, launch every decode step's kernels one by one instead of replaying "
                          "a captured CUDA graph (slower; for debugging)")
    srv.set_defaults(func=cmd_serve)

    ev = sub.add_parser("eval", help="evaluate a model: bits per byte, CMMLU, C-Eval, MMLU, ARC")
    ev.add_argument("--model", required=True, help="a run folder or its hf/ export")
    ev.add_argument("--task", required=True, choices=["bpb", "cmmlu", "ceval", "mmlu", "arc"])
    ev.add_argument("--data", action="append", metavar="[NAME=]PATH",
                    help="bpb: a pack folder (its val split) or text files (repeatable); cmmlu, ceval, mmlu: "
                         "the benchmark's folder as downloaded (dev/val/test CSVs, or per-subject parquet/jsonl); "
                         "arc: a JSONL file")
    ev.add_argument("--shots", type=int, default=None, help="k-shot (default: cmmlu, ceval, mmlu 5; arc 0)")
    ev.add_argument("--limit", type=int, default=None,
                    help="at most N documents per source (bpb) or items per subject (cmmlu, arc)")
    ev.add_argument("--subjects", default=None, help="comma-separated subjects (cmmlu) or pack sources (bpb)")
    ev.add_argument("--stride", type=int, default=None,
                    help="bpb: tokens between windows of a long document (default: context / 2)")
    ev.add_argument("--split", default=None,
                    help="the split to score (default: bpb val; cmmlu, mmlu test; ceval val, its test has no answers)")
    ev.add_argument("--doc-per-file", action="store_true", help="bpb: a text file is one document, not one per line")
    ev.add_argument("--baseline-train", action="append", metavar="[NAME=]PATH",
                    help="bpb: text the unigram and Kneser-Ney 3-gram baselines learn from (a pack: its train "
                         "split; repeatable; default: the train split of the packs in --data)")
    ev.add_argument("--no-baselines", action="store_true", help="bpb: score the model only")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    ev.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ev.add_argument("--output", help="write the JSON report here")
    ev.set_defaults(func=cmd_eval)

    demo = sub.add_parser("demo", help="run every stage on the embedded demo corpus")
    demo.add_argument("--workdir", default="zerolm-demo", help="where the demo writes (default ./zerolm-demo)")
    demo.add_argument("--overwrite", action="store_true", help="recompute every stage")
    demo.add_argument("--address", help="Ray cluster address (default: local Ray)")
    demo.add_argument("--no-serve", action="store_true", help="stop after evaluation instead of serving the model")
    demo.add_argument("--port", type=int, default=8000, help="port of the demo server (default 8000)")
    demo.add_argument("--rl", action="store_true",
                      help="then GRPO with a verifiable arithmetic reward, printing its reward curve (~4 more minutes)")
    demo.add_argument("--verbose", action="store_true", help="show Ray's own INFO lines and warnings")
    demo.set_defaults(func=cmd_demo)

    pipeline = sub.add_parser("pipeline", help="every stage in order from one YAML file")
    pipeline_sub = pipeline.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")
    prun = pipeline_sub.add_parser("run", help="run the pipeline's stages (each skipped when already done)")
    prun.add_argument("config", help="PIPELINE.yaml: workdir, address, stages: {data: ..., tokenizer: ..., ...}")
    prun.add_argument("--from", dest="start", help="first stage to run (earlier ones must be finished)")
    prun.add_argument("--until", help="last stage to run")
    prun.add_argument("--workdir", help="override the file's workdir")
    prun.add_argument("--address", help="Ray cluster for every stage, e.g. ray://HEAD:10001 (default: local Ray; "
                                          "or submit the whole pipeline: zerolm submit -- pipeline run ...)")
    prun.add_argument("--overwrite", action="store_true", help="recompute stages that are already done")
    prun.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a key, e.g. --set stages.pretrain.max_steps=100 (repeatable)")
    prun.add_argument("--verbose", action="store_true", help="show Ray's own INFO lines and warnings")
    prun.set_defaults(func=cmd_pipeline_run)

    lineage = sub.add_parser("lineage", help="what an output folder was made from, back to the raw files")
    lineage.add_argument("dir", help="any finished output folder (clean corpus, tokenizer, tokens, run)")
    lineage.add_argument("--json", action="store_true", help="the tree as JSON")
    lineage.set_defaults(func=cmd_lineage)

    submit = sub.add_parser("submit", help="submit a zerolm command to a Ray cluster as a Ray job; list, "
                                           "watch and stop jobs")
    submit.add_argument("--address", help="Ray dashboard address, e.g. http://head:8265 "
                                          "(default: $RAY_API_SERVER_ADDRESS, or an http $RAY_ADDRESS)")
    submit.add_argument("--token-file", help="file holding the cluster's auth token (default: $RAY_AUTH_TOKEN, "
                                             "$RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")
    submit.add_argument("--working-dir", default=None, help="folder uploaded with the job (configs, code)")
    submit.add_argument("--no-wait", action="store_true", help="return after submitting")
    submit.add_argument("--list", action="store_true", help="list the cluster's jobs")
    submit.add_argument("--status", metavar="JOB_ID", help="a job's status (exit 1 if it failed or was stopped)")
    submit.add_argument("--logs", metavar="JOB_ID", help="print a job's logs so far")
    submit.add_argument("--stop", metavar="JOB_ID", help="stop a running job")
    submit.add_argument("command", nargs=argparse.REMAINDER, help="the zerolm command line, after --")
    submit.set_defaults(func=cmd_submit)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(train_stages=bool(argv) and argv[0] == "train")
    args = parser.parse_args(argv)
    if getattr(args, "input", None) and isinstance(args.input[0], list):
        args.input = [item for group in args.input for item in group]
    try:
        return args.func(args)
    except UserError as exc:
        print(f"zerolm: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("zerolm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
