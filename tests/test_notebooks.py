"""Every teaching notebook runs top to bottom on CPU, within its time budget, with no error.

The notebooks carry their own checks (asserts against the real modules), so executing them is the
test. They are executed in memory: the committed files stay without outputs.
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


@pytest.fixture(scope="session")
def kernel_name(tmp_path_factory):
    """A kernelspec for this very interpreter (so the notebooks import the `llama` under test), found
    through JUPYTER_PATH: works on a fresh machine with no Jupyter kernel installed."""
    from ipykernel.kernelspec import write_kernel_spec

    base = tmp_path_factory.mktemp("jupyter")
    write_kernel_spec(base / "kernels" / KERNEL, overrides={"display_name": KERNEL})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", os.pathsep.join(filter(None, [str(base), os.environ.get("JUPYTER_PATH")])))
        yield KERNEL


def test_there_are_notebooks():
    names = [p.name for p in NOTEBOOKS]
    for prefix in ("01_", "02_", "03_", "04_", "05_"):
        assert any(n.startswith(prefix) for n in names), f"no notebook {prefix}* in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_without_large_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert path.stat().st_size < 200_000, f"{path.name}: clear its outputs before committing"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert "class Transformer" not in cell.source and "def apply_rotary_emb" not in cell.source, (
                f"{path.name}: import model code from llama, do not paste it"
            )
    assert any("import llama" in c.source or "from llama" in c.source for c in nb.cells)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, kernel_name):
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
