"""The README's reading tour stays honest: the files it names exist, in the promised order, and
their line counts are within 10% of the real ones. Every notebook is listed in the teaching section."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
ROW = re.compile(r"^\|\s*(\d*)\s*\|\s*`([^`]+)`\s*\|\s*(\d+)\s*\|\s*(.*?)\s*\|\s*$")


def section(name: str) -> str:
    match = re.search(rf"<!-- section:{name} -->(.*?)<!-- /section:{name} -->", README, re.S)
    assert match, f"README.md has no section {name!r}"
    return match.group(1)


def tour_rows():
    """(order or None, path, stated line count, purpose) for each table row naming a file."""
    rows = []
    for line in section("tour").splitlines():
        m = ROW.match(line.strip())
        if m:
            rows.append((int(m.group(1)) if m.group(1) else None, m.group(2), int(m.group(3)), m.group(4)))
    return rows


def test_tour_names_existing_files_with_line_counts_within_10_percent():
    rows = tour_rows()
    assert len(rows) >= 8, "the tour table should cover the main files"
    wrong = []
    for _, path, stated, purpose in rows:
        file = ROOT / path
        assert file.is_file(), f"README tour names {path}, which does not exist"
        assert purpose, f"README tour: {path} has no one-line purpose"
        actual = len(file.read_text(encoding="utf-8").splitlines())
        if abs(stated - actual) > 0.1 * actual:
            wrong.append(f"{path}: README says {stated} lines, it has {actual}")
    assert not wrong, "update the README tour's line counts:\n" + "\n".join(wrong)


def test_tour_reading_order():
    rows = tour_rows()
    numbered = [(order, path) for order, path, _, _ in rows if order is not None]
    orders = [o for o, _ in numbered]
    assert orders == list(range(1, len(orders) + 1)), f"tour order numbers should be 1, 2, 3, ...: {orders}"
    position = {path: o for o, path in numbered}
    spine = ["llama/model.py", "llama/generation.py", "llama/parallel.py", "train.py"]
    for path in spine:
        assert path in position, f"the reading order must include {path}"
    assert [position[p] for p in spine] == sorted(position[p] for p in spine), (
        "reading order must be model.py -> generation.py -> parallel.py -> train.py"
    )
    named = {path for _, path, _, _ in rows}
    for path in ["llama/checkpoint.py", "llama/tokenizer.py", "llama/data.py", "llama/training.py", "llama/plan.py"]:
        assert path in named, f"the tour should list {path}"


def test_teaching_section_lists_every_notebook():
    teaching = section("teaching")
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert f"notebooks/{nb.name}" in teaching, f"README teaching section does not mention notebooks/{nb.name}"
