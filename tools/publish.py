"""Publish the teaching material with its outputs, so a reader sees every figure without running anything.

    python tools/publish.py                 # the diagrams, then every notebook executed and rendered
    python tools/publish.py --only 00 06    # some notebooks (by number prefix)
    python tools/publish.py --figures       # the diagrams only (seconds)

Each notebook in notebooks/ is executed top to bottom on this machine (nbclient, a kernel for this
Python) and rendered as Markdown: docs/notebooks/<name>.md with its figures as PNGs in
docs/notebooks/<name>/. The committed notebooks stay without outputs; the page records the hash of
the notebook's cells, and tests/test_publish.py checks that every page is current with its notebook
(same hash, same code, figures present) and that the diagrams are the ones tools/diagrams.py draws.
"""

import argparse
import base64
import datetime
import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the llama package of this checkout
from llama.common import files  # noqa: E402
from llama.common.threads import set_wait_policy  # noqa: E402  (imports no torch)

NOTEBOOKS = ROOT / "notebooks"
PUBLISHED = ROOT / "docs" / "notebooks"
KERNEL = "llama-ref-publish"
MAX_OUTPUT_LINES = 60  # a longer text output is cut in the page (the notebook keeps it all)
HEADER = re.compile(r"<!-- published from notebooks/(\S+) by tools/publish.py; cells sha256 ([0-9a-f]{64}) -->")


def cells_hash(nb) -> str:
    """The notebook's content as a reader writes it: each cell's type and source (no outputs, no ids)."""
    content = json.dumps([[c.cell_type, c.source] for c in nb.cells], ensure_ascii=False)
    return hashlib.sha256(content.encode("utf-8")).hexdigest()


def write_kernel_spec(base: Path, name: str) -> None:
    """A kernelspec for this very interpreter under `base` (found through JUPYTER_PATH), so a notebook
    imports the `llama` of this checkout on a machine with no Jupyter kernel installed."""
    from ipykernel.kernelspec import write_kernel_spec as write

    write(base / "kernels" / name, overrides={"display_name": name})


def execute(path: Path, timeout: int = 1800):
    """The notebook, executed in memory (its cells' outputs filled in), the seconds it took and the CPU
    seconds its kernel used."""
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as base:
        write_kernel_spec(Path(base), KERNEL)
        os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [base, os.environ.get("JUPYTER_PATH")]))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        set_wait_policy()  # the kernel inherits it: waiting OpenMP threads sleep (llama/common/threads.py)
        client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name=KERNEL,
                                         resources={"metadata": {"path": str(path.parent)}})
        start, cpu = time.perf_counter(), children_cpu_seconds()
        client.execute()  # the kernel (and the processes it starts) are waited for: their CPU time counts
        return nb, time.perf_counter() - start, children_cpu_seconds() - cpu


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's finished children: on a shared machine the wall
    time says more about the other jobs than about the notebook, the CPU time much less."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def relink(markdown: str) -> str:
    """Rewrite the relative links and images of a notebook's Markdown (relative to notebooks/) for its
    published page (docs/notebooks/)."""
    def fix(match):
        target = match.group(2)
        if re.match(r"[a-z]+:|#|/", target):
            return match.group(0)
        path, _, anchor = target.partition("#")
        moved = os.path.relpath(NOTEBOOKS / path, PUBLISHED).replace(os.sep, "/")
        return f"{match.group(1)}{moved}{'#' + anchor if anchor else ''})"

    return re.sub(r"(\]\()([^)\s]+)\)", fix, markdown)


def text_block(text: str) -> str:
    lines = text.rstrip("\n").splitlines()
    if len(lines) > MAX_OUTPUT_LINES:
        cut = len(lines) - MAX_OUTPUT_LINES
        lines = lines[:MAX_OUTPUT_LINES // 2] + [f"... ({cut} lines cut here; the notebook shows them)"] + \
            lines[-MAX_OUTPUT_LINES // 2:]
    return "```text\n" + "\n".join(lines) + "\n```\n"


def render(nb, name: str, seconds: float, cpu: float = float("nan")) -> tuple:
    """(the page's Markdown, {figure file name: PNG bytes}) for an executed notebook."""
    stem = Path(name).stem
    figures, parts = {}, []
    parts.append(f"<!-- published from notebooks/{name} by tools/publish.py; cells sha256 {cells_hash(nb)} -->\n")
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            parts.append(relink(cell.source) + "\n")
            if i == 0:
                parts.append(f"*Executed by `python tools/publish.py` on {facts(seconds, cpu)}. The notebook: "
                             f"[notebooks/{name}](../../notebooks/{name}).*\n")
            continue
        if cell.cell_type != "code":
            continue
        parts.append("```python\n" + cell.source.rstrip("\n") + "\n```\n")
        for output in cell.get("outputs", []):
            kind = output.get("output_type")
            if kind == "stream":
                parts.append(text_block(output.get("text", "")))
            elif kind in ("execute_result", "display_data"):
                data = output.get("data", {})
                if "image/png" in data:
                    file = f"{stem}/cell{i:02d}-{len(figures) + 1}.png"
                    figures[file] = base64.b64decode(data["image/png"])
                    parts.append(f"![output of cell {i}]({file})\n")
                elif "text/plain" in data:
                    parts.append(text_block(data["text/plain"]))
    return "\n".join(parts), figures


@functools.lru_cache(maxsize=None)
def revision() -> str:
    """The checkout's commit (-dirty: with uncommitted changes), read once before any page is written,
    so that the pages of one run do not call each other's changes dirty."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              cwd=ROOT).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def facts(seconds: float, cpu: float) -> str:
    """When, where and on which code the page was executed."""
    import platform

    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{datetime.date.today().isoformat()}, code {revision()}, torch {torch.__version__}, "
            f"{platform.machine()} with {os.cpu_count()} CPUs (load average {load:.1f}), in {seconds:.0f} s "
            f"({cpu:.0f} CPU-seconds)")


def publish_notebook(path: Path) -> tuple:
    nb, seconds, cpu = execute(path)
    page, figures = render(nb, path.name, seconds, cpu)
    folder = PUBLISHED / path.stem
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):  # a figure the notebook no longer draws must not linger
        if f"{path.stem}/{old.name}" not in figures:
            old.unlink()
    for file, data in figures.items():  # each file whole or not at all (llama/common/files.py)
        files.write_bytes(PUBLISHED / file, data)
    files.write_text(PUBLISHED / f"{path.stem}.md", page)
    return seconds, cpu


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NN", help="number prefixes of the notebooks to publish")
    parser.add_argument("--figures", action="store_true", help="redraw the diagrams only")
    args = parser.parse_args(argv)
    revision()  # before anything is written
    sys.path.insert(0, str(ROOT / "tools"))
    import diagrams

    for path in diagrams.draw_all(diagrams.FIGURES):
        print(f"drew {path.relative_to(ROOT)}")
    if args.figures:
        return 0
    chosen = sorted(NOTEBOOKS.glob("*.ipynb"))
    if args.only:
        chosen = [p for p in chosen if p.name.split("_")[0] in args.only]
        if not chosen:
            print(f"error: no notebook numbered {' '.join(args.only)} in notebooks/", file=sys.stderr)
            return 1
    total = total_cpu = 0.0
    for path in chosen:
        seconds, cpu = publish_notebook(path)
        total, total_cpu = total + seconds, total_cpu + cpu
        print(f"published docs/notebooks/{path.stem}.md ({seconds:.0f} s, {cpu:.0f} CPU-s)", flush=True)
    print(f"{len(chosen)} notebooks in {total:.0f} s ({total_cpu:.0f} CPU-s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
