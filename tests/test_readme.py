"""The README stays a newcomer's page and stays honest: the reading tour names files that exist, in
the promised order, with line counts within 10% of the real ones; every notebook is listed (README
and docs/teaching.md); the README stays small; every link from the README and docs/ resolves
(file and heading); every benchmark script's command is kept in docs/, and the files the docs name exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = ROOT / "docs"
README_MAX_BYTES = 12_800  # ~12.5 KB: nanoGPT's and gpt-fast's READMEs are 9-17 KB; measurements go to docs/
# Pages the README must link by name (they answer issues a newcomer asks about first).
REQUIRED_DOCS = {"docs/reliability.md", "docs/evaluation.md", "docs/fsdp.md"}
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
    spine = ["llama/model.py", "llama/generation/generator.py", "llama/parallel/__init__.py", "train.py"]
    for path in spine:
        assert path in position, f"the reading order must include {path}"
    assert [position[p] for p in spine] == sorted(position[p] for p in spine), (
        "reading order must be model.py -> generation.py -> parallel.py -> train.py"
    )
    named = {path for _, path, _, _ in rows}
    for path in ["llama/checkpoint/load.py", "llama/tokenizer/__init__.py", "llama/data/prepare.py", "llama/train/loop.py", "llama/plan.py"]:
        assert path in named, f"the tour should list {path}"


def test_teaching_section_lists_every_notebook():
    teaching = section("teaching")
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert f"notebooks/{nb.name}" in teaching, f"README teaching section does not mention notebooks/{nb.name}"


def test_docs_teaching_page_lists_every_notebook():
    teaching = (DOCS / "teaching.md").read_text(encoding="utf-8")
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert f"notebooks/{nb.name}" in teaching, f"docs/teaching.md does not mention notebooks/{nb.name}"


def test_readme_is_small():
    size = len(README.encode("utf-8"))
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes (limit {README_MAX_BYTES}): move measurements and deep dives to docs/"
    )


# ---- links ----

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces -> hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set:
    text = FENCE.sub("", text)  # a '# comment' in a bash block is not a heading
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} +(.+?) *$", text, re.M)}


def local_links(text: str):
    """(target path or '', anchor or '') for each markdown link that is not a URL."""
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        yield path, anchor


def broken_links(page: Path) -> list:
    text = page.read_text(encoding="utf-8")
    broken = []
    for path, anchor in local_links(text):
        file = (page.parent / path).resolve() if path else page
        rel = file.relative_to(ROOT).as_posix() if file.is_relative_to(ROOT) else str(file)
        if not file.exists():
            broken.append(f"{path}: no such file")
            continue
        if anchor and file.suffix == ".md" and anchor not in anchors(file.read_text(encoding="utf-8")):
            broken.append(f"{path}#{anchor}: no such heading in {rel}")
    return broken


def test_readme_links_to_docs_resolve():
    targets = [path for path, _ in local_links(README)]
    assert sum(p.startswith("docs/") for p in targets) >= 5, "the README should link its docs/ pages"
    for required in sorted(REQUIRED_DOCS):
        assert required in targets, f"the README's docs list should link {required}"
    broken = broken_links(ROOT / "README.md")
    assert not broken, "README.md has broken links:\n" + "\n".join(broken)


def linked_pages(page: Path) -> set:
    return {(page.parent / path).resolve() for path, _ in local_links(page.read_text(encoding="utf-8")) if path}


def test_every_docs_page_is_reachable_from_the_readme_and_its_links_resolve():
    pages = sorted(DOCS.glob("*.md"))
    assert pages, "docs/ has no pages"
    reached, todo = set(), [ROOT / "README.md"]
    while todo:  # follow links README -> docs/x.md -> docs/y.md ...
        for target in linked_pages(todo.pop()) - reached:
            reached.add(target)
            if target.suffix == ".md" and target.exists():
                todo.append(target)
    broken = []
    for page in pages:
        rel = page.relative_to(ROOT).as_posix()
        if page.resolve() not in reached:
            broken.append(f"{rel}: no link leads to it from README.md")
        broken += [f"{rel}: {b}" for b in broken_links(page)]
    assert not broken, "\n".join(broken)


# ---- measurements keep their commands ----

def test_every_benchmark_is_documented_with_its_command():
    docs = "\n".join(p.read_text(encoding="utf-8") for p in sorted(DOCS.glob("*.md")))
    for script in sorted((ROOT / "bench").glob("*.py")):
        if script.name.startswith("_"):  # a helper module the benchmarks import, not a benchmark
            continue
        command = f"python bench/{script.name}"
        assert command in docs, f"no docs/ page gives the command `{command}` with its measurements"


def test_files_the_docs_name_exist():
    """bench scripts, tests, configs and notebooks named in backticks or commands (llama/ paths are
    the tour's, checked above)."""
    named = re.compile(r"(?<![\w/.~-])((?:bench|tests|configs|notebooks)/[\w./-]*\w)")
    missing = []
    for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        for path in set(named.findall(page.read_text(encoding="utf-8"))):
            if not (ROOT / path).exists():
                missing.append(f"{page.relative_to(ROOT).as_posix()}: {path}")
    assert not missing, "docs name files that do not exist:\n" + "\n".join(sorted(missing))
