"""MMLU: 57 subjects in English, in the prompt of its original evaluation code
(hendrycks/test evaluate.py, which lm-eval's mmlu task also reproduces):

    The following are multiple choice questions (with answers) about {subject}.\\n\\n
    {q}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer: {X}\\n\\n      (once per shot, from dev)
    {q}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer:

with the subject's file name in words ("high_school_physics" -> "high school physics")
and " A", " B", ... scored (with the space the shots have). Files: any layout of
serve/eval/exams.py (the official data.tar: {dev,val,test}/<subject>_{split}.csv
without a header row; the Hugging Face cais/mmlu parquet folders, `choices` a list and
`answer` an index). test is scored.
"""

from __future__ import annotations

from serve.eval.exams import Exam

MMLU = Exam(name="mmlu", eval_split="test",
            header="The following are multiple choice questions (with answers) about {subject}.\n\n",
            subject_names={}, answer_prefix=" ", answer_cue="Answer:")
