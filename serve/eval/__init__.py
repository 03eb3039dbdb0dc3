"""Evaluation tasks, one file each, as plain functions over a `Scorer` (no HTTP here):

  bpb.py              bits per byte / perplexity per domain (pack val split or text files)
  multiple_choice.py  k-shot multiple choice by log-likelihood, accuracy bookkeeping
  cmmlu.py, arc.py    the CMMLU/C-Eval CSV and ARC JSONL formats and their prompts
  report.py           JSON report and markdown table
  run.py              `zerolm eval` (model loaded in-process)
  api.py              POST /v1/evaluations (through the server's batching thread)
"""
