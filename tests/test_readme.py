"""The README stays a newcomer's page and stays honest: the reading tour names files that exist, in
the promised order, and states no line counts (they drift with every change); every notebook is
listed (README and docs/teaching.md); the README stays small; every link from the README and docs/
resolves (file and heading); every benchmark script's command is kept in docs/, the files the docs
name exist, and every flag a table (or a "flags:" list) names exists in its command line's parser."""

import argparse
import re
import runpy
import sys
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = ROOT / "docs"
README_MAX_BYTES = 12_800  # ~12.5 KB: nanoGPT's and gpt-fast's READMEs are 9-17 KB; measurements go to docs/
# Pages the README must link by name (they answer issues a newcomer asks about first).
REQUIRED_DOCS = {"docs/reliability.md", "docs/evaluation.md", "docs/fsdp.md"}
ROW = re.compile(r"^\|\s*(\d*)\s*\|\s*`([^`]+)`\s*\|\s*(.*?)\s*\|\s*$")


def section(name: str) -> str:
    match = re.search(rf"<!-- section:{name} -->(.*?)<!-- /section:{name} -->", README, re.S)
    assert match, f"README.md has no section {name!r}"
    return match.group(1)


def tour_rows():
    """(order or None, path, None, purpose) for each table row naming a file."""
    rows = []
    for line in section("tour").splitlines():
        m = ROW.match(line.strip())
        if m:
            rows.append((int(m.group(1)) if m.group(1) else None, m.group(2), None, m.group(3)))
    return rows


def test_tour_names_existing_files_and_no_line_counts():
    rows = tour_rows()
    assert len(rows) >= 8, "the tour table should cover the main files"
    for _, path, _, purpose in rows:
        file = ROOT / path
        assert file.is_file(), f"README tour names {path}, which does not exist"
        assert purpose, f"README tour: {path} has no one-line purpose"
        assert not re.fullmatch(r"\d+", purpose.split("|")[0].strip()), f"README tour: {path} states a line count"
    assert not re.search(r"\|\s*lines\s*\|", section("tour")), "the tour states no line counts: they drift"


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


# ---- flags the docs name exist ----

class _Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


def option_strings(parser: argparse.ArgumentParser) -> set:
    """Every option of `parser` and of its subcommands."""
    out = set()
    for action in parser._actions:
        out.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out |= option_strings(sub)
    return out


def cli_options(command: str) -> set:
    """The options of a command line, read from the argparse parser it builds (stopped before parsing)."""
    def stop(parser, *args, **kwargs):
        raise _Parsed(parser)

    entry = {"generate.py": "llama.generation.cli", "python -m llama.eval": "llama.eval.cli",
             "python -m llama.convert": "llama.checkpoint.convert", "python -m llama.data": "llama.data.prepare",
             "python -m llama.tokenizer": "llama.tokenizer", "python -m llama.plan": "llama.plan"}.get(command)
    with mock.patch.object(argparse.ArgumentParser, "parse_args", stop), \
            mock.patch.object(argparse.ArgumentParser, "parse_known_args", stop), \
            mock.patch.object(sys, "argv", [command]), mock.patch.object(sys, "path", [str(ROOT / "bench"), *sys.path]):
        try:
            if entry:
                __import__(entry, fromlist=["main"]).main([])
            else:  # a bench script, run as __main__ up to its parser
                runpy.run_path(str(ROOT / command.removeprefix("python ")), run_name="__main__")
        except _Parsed as parsed:
            return option_strings(parsed.parser)
    raise AssertionError(f"{command} built no argparse parser")


COMMAND = re.compile(r"python -m llama\.(?:eval|convert|data|tokenizer|plan)|(?:python )?bench/\w+\.py|(?<![/\w])generate\.py")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# The command line a page's tables mean when a row names none (the page is about that command).
PAGE_COMMAND = {"README.md": "generate.py", "docs/generation.md": "generate.py", "docs/performance.md": "generate.py",
                "docs/performance-notes.md": "generate.py", "docs/quantization.md": "generate.py",
                "docs/planner.md": "python -m llama.plan", "docs/fsdp.md": "python bench/train.py",
                "docs/training.md": "python bench/train.py", "docs/evaluation.md": "python -m llama.eval"}


def command_of(text: str):
    m = COMMAND.search(text)
    if m is None:
        return None
    return m.group(0) if m.group(0).startswith("python") or m.group(0) == "generate.py" else f"python {m.group(0)}"


def named_flags():
    """(page, line number, command, flag) for each flag in backticks in a table row or a "flags:" list:
    the command is the one named in the same backticks, else in the row, else the page's."""
    for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        rel = page.relative_to(ROOT).as_posix()
        for n, line in enumerate(FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), page.read_text("utf-8")).splitlines(), 1):
            if not (line.lstrip().startswith("|") or re.search(r"\b[Ff]lags:", line)):
                continue
            for span in re.findall(r"`([^`]*)`", line):
                for flag in FLAG.findall(span):
                    yield rel, n, command_of(span) or command_of(line) or PAGE_COMMAND.get(rel), flag


def test_every_flag_a_docs_table_names_exists_in_its_command_line():
    found, missing, options = 0, [], {}
    for page, n, command, flag in named_flags():
        assert command, f"{page}:{n}: {flag} names no command line: name it in the row (or in PAGE_COMMAND)"
        if command not in options:
            options[command] = cli_options(command)
        found += 1
        if flag not in options[command]:
            missing.append(f"{page}:{n}: {command} has no {flag}")
    assert found >= 40 and len(options) >= 5  # the check reads the tables it means to
    assert not missing, "docs name flags their command lines lack:\n" + "\n".join(missing)
