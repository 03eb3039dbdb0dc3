"""Evaluation tasks, one file each, as plain functions over a `Scorer` (no HTTP here):

  bpb.py              bits per byte / perplexity per domain (pack val split or text files)
  baselines.py        unigram and Kneser-Ney 3-gram bits per byte beside the model's
  multiple_choice.py  k-shot multiple choice by log-likelihood, accuracy bookkeeping
  exams.py            exam benchmarks' file layouts (CSV, parquet, jsonl) and prompt shape
  cmmlu.py, ceval.py, mmlu.py   each exam's prompt header and subject names
  arc.py              the ARC JSONL format and its prompt
  report.py           JSON report and markdown table
  run.py              `zerolm eval` (model loaded in-process)
  api.py              POST /v1/evaluations (through the server's batching thread)
"""
