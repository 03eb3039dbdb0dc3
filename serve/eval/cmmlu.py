"""CMMLU / C-Eval: Chinese multiple choice from CSV files, in the official prompt.

Layout: ROOT/{dev,test}/<subject>.csv (CMMLU, columns `,Question,A,B,C,D,Answer`) or
ROOT/{dev,val}/<subject>_{dev,val}.csv (C-Eval, `id,question,A,B,C,D,answer,...`;
its test split has no answers, so val is evaluated). ROOT may also be the folder
holding `data/`. The k shots of a subject are the first k rows of its dev file.

The prompt is the one of the CMMLU repository (haonan-li/CMMLU, src/mp_utils.py):

    以下是关于{科目}的单项选择题，请直接给出正确答案的选项。\n\n
    题目：{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\n答案：{X}\n\n      (once per shot)
    题目：{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\n答案：

and the continuation scored is the bare letter "A", "B", ... (no space): exactly the
text that follows 答案： in the shots, and the token the official code reads the
probability of. lm-eval's own cmmlu task puts a space before the letter (" A", with
shots "答案： A"); a task YAML with target_delimiter "" reproduces this prompt
(tests/serve/test_lm_eval.py checks that lm-eval sends the same context).
"""

from __future__ import annotations

import csv
from pathlib import Path

from serve.eval.multiple_choice import MCItem, Prompt
from zerolm.errors import UserError

HEADER = "以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n"

# CMMLU's file names -> the Chinese subject names its prompt uses (name_en2zh in the
# CMMLU repository, the same table as lm-eval's tasks/cmmlu). Others keep their name.
SUBJECTS_ZH = {
    "agronomy": "农学", "anatomy": "解剖学", "ancient_chinese": "古汉语", "arts": "艺术学",
    "astronomy": "天文学", "business_ethics": "商业伦理", "chinese_civil_service_exam": "中国公务员考试",
    "chinese_driving_rule": "中国驾驶规则", "chinese_food_culture": "中国饮食文化",
    "chinese_foreign_policy": "中国外交政策", "chinese_history": "中国历史", "chinese_literature": "中国文学",
    "chinese_teacher_qualification": "中国教师资格", "clinical_knowledge": "临床知识",
    "college_actuarial_science": "大学精算学", "college_education": "大学教育学",
    "college_engineering_hydrology": "大学工程水文学", "college_law": "大学法律",
    "college_mathematics": "大学数学", "college_medical_statistics": "大学医学统计",
    "college_medicine": "大学医学", "computer_science": "计算机科学", "computer_security": "计算机安全",
    "conceptual_physics": "概念物理学", "construction_project_management": "建设工程管理",
    "economics": "经济学", "education": "教育学", "electrical_engineering": "电气工程",
    "elementary_chinese": "小学语文", "elementary_commonsense": "小学常识",
    "elementary_information_and_technology": "小学信息技术", "elementary_mathematics": "初等数学",
    "ethnology": "民族学", "food_science": "食品科学", "genetics": "遗传学", "global_facts": "全球事实",
    "high_school_biology": "高中生物", "high_school_chemistry": "高中化学", "high_school_geography": "高中地理",
    "high_school_mathematics": "高中数学", "high_school_physics": "高中物理学",
    "high_school_politics": "高中政治", "human_sexuality": "人类性行为", "international_law": "国际法学",
    "journalism": "新闻学", "jurisprudence": "法理学", "legal_and_moral_basis": "法律与道德基础",
    "logical": "逻辑学", "machine_learning": "机器学习", "management": "管理学", "marketing": "市场营销",
    "marxist_theory": "马克思主义理论", "modern_chinese": "现代汉语", "nutrition": "营养学",
    "philosophy": "哲学", "professional_accounting": "专业会计", "professional_law": "专业法学",
    "professional_medicine": "专业医学", "professional_psychology": "专业心理学",
    "public_relations": "公共关系", "security_study": "安全研究", "sociology": "社会学",
    "sports_science": "体育学", "traditional_chinese_medicine": "中医中药", "virology": "病毒学",
    "world_history": "世界历史", "world_religions": "世界宗教",
}


def subject_zh(subject: str) -> str:
    return SUBJECTS_ZH.get(subject, subject.replace("_", " "))


def _example(item: MCItem) -> str:
    options = "".join(f"\n{label}. {choice}" for label, choice in zip(item.labels, item.choices))
    return f"题目：{item.question}{options}\n答案："


def cmmlu_prompt(item: MCItem, shots: list[MCItem]) -> Prompt:
    shown = "".join(_example(s) + s.labels[s.gold] + "\n\n" for s in shots)
    return Prompt(HEADER.format(subject=subject_zh(item.subject)) + shown + _example(item), list(item.labels))


# ------------------------------------------------------------------ loading
def _root(path: Path) -> Path:
    for cand in (path, path / "data"):
        if (cand / "dev").is_dir() and ((cand / "test").is_dir() or (cand / "val").is_dir()):
            return cand
    raise UserError(f"{path}: not a CMMLU/C-Eval folder (expected dev/ and test/ or val/ with <subject>.csv)")


def _subject_files(folder: Path, split: str) -> dict[str, Path]:
    out = {}
    for f in sorted(folder.glob("*.csv")):
        name = f.stem.removesuffix(f"_{split}")  # C-Eval: accountant_val.csv
        out[name] = f
    return out


def read_csv(path: Path, subject: str) -> list[MCItem]:
    """One CSV file. Choices are the columns named by one capital letter, in order."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            rows = list(csv.reader(fh))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 ({exc.reason})")
    if not rows:
        return []
    header = [h.strip() for h in rows[0]]
    lower = [h.lower() for h in header]
    letters = [i for i, h in enumerate(header) if len(h) == 1 and h.isupper()]
    if "question" not in lower or "answer" not in lower or len(letters) < 2:
        raise UserError(f"{path}: expected columns Question, A, B, ..., Answer; got {header}")
    q_col, a_col = lower.index("question"), lower.index("answer")
    labels = [header[i] for i in letters]
    items = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            raise UserError(f"{path}:{line}: {len(row)} columns, expected {len(header)}")
        answer = row[a_col].strip()
        if answer not in labels:
            raise UserError(f"{path}:{line}: answer {answer!r} is not one of {labels}")
        key = row[0].strip() if header[0].lower() in ("", "id") and row[0].strip() else str(line - 2)
        items.append(MCItem(id=f"{subject}/{key}", subject=subject, question=row[q_col],
                            choices=[row[i] for i in letters], gold=labels.index(answer), labels=labels))
    return items


def load_cmmlu(path: str | Path, *, subjects: list[str] | None = None, limit: int | None = None
               ) -> tuple[list[MCItem], dict[str, list[MCItem]]]:
    """(evaluation items, subject -> dev items for shots). limit: items per subject."""
    root = _root(Path(path))
    split = "val" if (root / "val").is_dir() else "test"  # C-Eval's test split has no answers
    files = _subject_files(root / split, split)
    dev_files = _subject_files(root / "dev", "dev")
    if subjects:
        unknown = sorted(set(subjects) - set(files))
        if unknown:
            raise UserError(f"unknown subject(s) {unknown}; {root / split} has {len(files)}: "
                            f"{', '.join(sorted(files)[:8])}{', ...' if len(files) > 8 else ''}")
    chosen = subjects or sorted(files)
    items, dev = [], {}
    for subject in chosen:
        rows = read_csv(files[subject], subject)
        items += rows[:limit] if limit is not None else rows
        dev[subject] = read_csv(dev_files[subject], subject) if subject in dev_files else []
    if not items:
        raise UserError(f"{root / split}: no questions")
    return items, dev
