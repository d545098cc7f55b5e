"""The published teaching material is current: every notebook's page under docs/notebooks/ was
rendered from the notebook as it is now (its cells' hash, its code, its figures present), the
diagrams in docs/figures/ are what tools/diagrams.py draws, and every image a notebook shows exists.
Regenerate with `python tools/publish.py` (the notebooks: minutes) or `--figures` (seconds)."""

import hashlib
import importlib.util
import json
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
FIGURES = ROOT / "docs" / "figures"
PUBLISHED = ROOT / "docs" / "notebooks"
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
FIX = "run `python tools/publish.py --only {}` (executes the notebook) and commit docs/notebooks/"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


publish = load("publish")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_published_page_is_current_with_its_notebook(path):
    page = PUBLISHED / f"{path.stem}.md"
    number = path.name.split("_")[0]
    assert page.is_file(), f"{path.name} has no published page {page.relative_to(ROOT)}: " + FIX.format(number)
    text = page.read_text(encoding="utf-8")
    nb = nbformat.read(path, as_version=4)
    header = publish.HEADER.search(text)
    assert header and header.group(1) == path.name, f"{page.name}: no publish header naming {path.name}"
    assert header.group(2) == publish.cells_hash(nb), f"{page.name} is older than {path.name}: " + FIX.format(number)
    code = [c.source.rstrip("\n") for c in nb.cells if c.cell_type == "code"]
    shown = [block.rstrip("\n") for block in re.findall(r"^```python\n(.*?)^```$", text, re.S | re.M)]
    assert shown == code, f"{page.name}: its code blocks are not {path.name}'s cells"
    images = IMAGE.findall(text)
    missing = [i for i in images if not re.match(r"[a-z]+:", i) and not (page.parent / i).is_file()]
    assert not missing, f"{page.name} shows images that do not exist: {missing}"
    folder = PUBLISHED / path.stem
    stray = [f.name for f in folder.glob("*.png") if f"{path.stem}/{f.name}" not in images] if folder.is_dir() else []
    assert not stray, f"{folder.relative_to(ROOT)} holds figures its page does not show: {stray}"


def test_every_published_page_has_a_notebook():
    names = {p.stem for p in NOTEBOOKS}
    orphans = [p.name for p in PUBLISHED.glob("*.md") if p.stem not in names]
    assert not orphans, f"docs/notebooks/ has pages of notebooks that no longer exist: {orphans}"


def test_published_figures_keep_the_repository_small():
    total = sum(f.stat().st_size for f in [*PUBLISHED.rglob("*"), *FIGURES.glob("*")] if f.is_file())
    assert total < 4_000_000, f"docs/notebooks + docs/figures are {total / 1e6:.1f} MB: shrink the figures"


def test_every_image_a_notebook_shows_exists():
    for path in NOTEBOOKS:
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "markdown":
                for target in IMAGE.findall(cell.source):
                    assert (path.parent / target).is_file(), f"{path.name} shows {target}, which does not exist"


def test_render_relinks_cuts_and_extracts_figures():
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# Title\n![a diagram](../docs/figures/gqa.png) [model](../docs/model.md#x)"),
        nbformat.v4.new_code_cell("print(1)", outputs=[
            nbformat.v4.new_output("stream", name="stdout", text="\n".join(map(str, range(200)))),
            nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"}),
        ]),
    ])
    page, figures = publish.render(nb, "99_demo.ipynb", 1.0)
    assert "![a diagram](../figures/gqa.png)" in page and "[model](../model.md#x)" in page
    assert "```python\nprint(1)\n```" in page
    assert "lines cut here" in page and "\n199\n" in page and "\n100\n" not in page
    assert list(figures) == ["99_demo/cell01-1.png"] and figures["99_demo/cell01-1.png"] == b"\x89PNG\r\n\x1a\n"
    assert publish.HEADER.search(page).group(2) == publish.cells_hash(nb)


def test_the_diagrams_in_docs_are_the_ones_the_script_draws():
    """Every PNG in docs/figures/ is drawn by tools/diagrams.py, and the manifest lists exactly them."""
    manifest = json.loads((FIGURES / "manifest.json").read_text())
    drawn = set(manifest["figures"])
    assert drawn == {p.name for p in FIGURES.glob("*.png")}, "docs/figures/ and its manifest disagree"
    for name, digest in manifest["figures"].items():
        assert hashlib.sha256((FIGURES / name).read_bytes()).hexdigest() == digest, (
            f"docs/figures/{name} changed by hand: redraw with `python tools/publish.py --figures`")


@pytest.mark.slow
def test_the_diagrams_are_current(tmp_path):
    """Redrawn from the current code, each diagram is the committed one, byte for byte (with the
    matplotlib that drew them; another version renders text differently, so then it is skipped)."""
    import matplotlib

    manifest = json.loads((FIGURES / "manifest.json").read_text())
    if manifest["matplotlib"] != matplotlib.__version__:
        pytest.skip(f"docs/figures/ was drawn with matplotlib {manifest['matplotlib']}; this is {matplotlib.__version__}")
    diagrams = load("diagrams")
    redrawn = diagrams.draw_all(tmp_path)
    assert {p.name for p in redrawn} == set(manifest["figures"])
    stale = [p.name for p in redrawn if p.read_bytes() != (FIGURES / p.name).read_bytes()]
    assert not stale, f"docs/figures/ is older than tools/diagrams.py: {stale}; run `python tools/publish.py --figures`"
