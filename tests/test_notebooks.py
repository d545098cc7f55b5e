"""Every teaching notebook runs top to bottom on CPU, within its time budget, with no error.

The notebooks carry their own checks (asserts against the real modules), so executing them is the
test. They are executed in memory: the committed files stay without outputs (their executed copies
are published under docs/notebooks/ by tools/publish.py; tests/test_publish.py keeps them current).
"""

import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
BUDGET_S = 180  # each notebook must run on an idle 2-core CPU in 3 minutes or less
KERNEL = "llama-ref-test"
# The one notebook that writes model code, on purpose: it builds Llama 3.1 from a blank cell and holds
# each piece to llama/model.py (it must import llama.model to do so: checked below).
BUILDS_THE_MODEL = "00_build_llama.ipynb"


@pytest.fixture(scope="session")
def kernel_name(tmp_path_factory):
    """A kernelspec for this very interpreter (so the notebooks import the `llama` under test), found
    through JUPYTER_PATH: works on a fresh machine with no Jupyter kernel installed."""
    from ipykernel.kernelspec import write_kernel_spec

    from llama.common.threads import set_wait_policy

    base = tmp_path_factory.mktemp("jupyter")
    write_kernel_spec(base / "kernels" / KERNEL, overrides={"display_name": KERNEL})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", os.pathsep.join(filter(None, [str(base), os.environ.get("JUPYTER_PATH")])))
        # the kernel inherits the environment: waiting OpenMP threads sleep, as in the command lines
        # (on a shared CPU spinning threads made a notebook ~10x slower)
        for name, value in set_wait_policy({k: v for k, v in os.environ.items()}).items():
            mp.setenv(name, value)
        yield KERNEL


def test_there_are_notebooks():
    names = [p.name for p in NOTEBOOKS]
    for prefix in ("00_", "01_", "02_", "03_", "04_", "05_", "06_", "07_"):
        assert any(n.startswith(prefix) for n in names), f"no notebook {prefix}* in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_without_large_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert path.stat().st_size < 200_000, f"{path.name}: clear its outputs before committing"
    code = [cell.source for cell in nb.cells if cell.cell_type == "code"]
    if path.name == BUILDS_THE_MODEL:  # writes the model, and checks every piece against llama/model.py
        assert any("from llama import" in c and "model as M" in c for c in code)
        assert sum("assert_close" in c and "M." in c for c in code) >= 5
    else:
        for source in code:
            assert "class Transformer" not in source and "def apply_rotary_emb" not in source, (
                f"{path.name}: import model code from llama, do not paste it"
            )
    assert any("import llama" in c or "from llama" in c for c in code)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, kernel_name, tmp_path, monkeypatch):
    # The kernel inherits TMPDIR: a notebook that fails halfway leaves its work folder (notebook 03's
    # is 1.6 GB) where pytest deletes it, not in /tmp (CI shares this machine's disk).
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    nb = nbformat.read(path, as_version=4)
    load_before = busy_factor()
    client = nbclient.NotebookClient(  # the per-cell timeout only catches hangs; the budget is checked below
        nb, timeout=int(4 * BUDGET_S * load_before), kernel_name=kernel_name,
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    elapsed = time.perf_counter() - start
    budget = BUDGET_S * max(load_before, busy_factor())
    assert elapsed <= budget, f"{path.name} took {elapsed:.0f} s; the budget is {budget:.0f} s ({BUDGET_S} s idle)"


def busy_factor() -> float:
    """How many times over the CPUs are subscribed (1 on an idle machine): the budget is for an idle
    2-core machine, and a machine shared with other jobs stretches it rather than failing the test."""
    try:
        return max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
    except OSError:  # no load average on this platform
        return 1.0
