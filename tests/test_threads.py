"""llama/common/threads.py: the entry points (generate.py, train.py) set OpenMP's wait policy before torch
loads it, only when the user set none; importing the library sets nothing. libgomp itself is
asked what it runs with (OMP_DISPLAY_ENV=verbose prints its settings when it loads)."""

import os
import re
import subprocess
import sys

import pytest

from llama.common.threads import WAIT_POLICY, set_torch_threads, set_wait_policy, usable_cpus
from tests.helpers import ROOT


def gomp_spincount(code_or_script, extra_env=(), args=()):
    """GOMP_SPINCOUNT as the OpenMP runtime of a fresh process reports it, and its stdout."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env.update({"OMP_DISPLAY_ENV": "verbose", "PYTHONPATH": str(ROOT), **dict(extra_env)})
    cmd = [sys.executable, *(["-c", code_or_script] if "\n" in code_or_script or " " in code_or_script
                             else [str(ROOT / code_or_script)]), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    found = re.search(r"GOMP_SPINCOUNT = '(\d+)'", out.stderr)
    assert found, out.stderr[-2000:]
    return int(found.group(1)), out.stdout


LIBGOMP_DEFAULT = 300000  # libgomp's spin count when no wait variable is set


@pytest.mark.parametrize("script", ["generate.py", "train.py"])
def test_entry_points_set_passive_waiting_before_torch_loads(script):
    assert WAIT_POLICY == {"OMP_WAIT_POLICY": "PASSIVE"}
    spins, out = gomp_spincount(script, args=["--help"])
    assert spins == 0  # PASSIVE: libgomp read it, so it was set before torch loaded libgomp
    assert "OMP_WAIT_POLICY=PASSIVE" in " ".join(out.split())  # and --help says so


@pytest.mark.parametrize("user", [{"GOMP_SPINCOUNT": "5000"}, {"OMP_WAIT_POLICY": "ACTIVE"}])
def test_entry_points_keep_the_users_wait_policy(user):
    spins, _ = gomp_spincount("generate.py", user, ["--help"])
    assert spins == (5000 if "GOMP_SPINCOUNT" in user else 30_000_000_000)  # libgomp's ACTIVE spin count


def test_importing_the_library_changes_nothing_process_wide():
    code = ("import os, sys, torch\ndefault = torch.get_num_threads()\n"
            "import llama, llama.generation, llama.generation.compile, llama.common.threads, llama.train.setup\n"
            "assert 'OMP_WAIT_POLICY' not in os.environ and torch.get_num_threads() == default\nprint('ok')")
    spins, out = gomp_spincount(code)
    assert spins == LIBGOMP_DEFAULT and out.strip() == "ok"
    code = "import sys, llama\nprint('torch' in sys.modules)"  # and `import llama` loads no torch
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.strip() == "False"


def test_set_wait_policy_only_when_unset():
    env = {}
    assert set_wait_policy(env) == WAIT_POLICY and env == WAIT_POLICY
    for user in ({"GOMP_SPINCOUNT": "1000"}, {"OMP_WAIT_POLICY": "active"}, {"KMP_BLOCKTIME": "0"}):
        env = dict(user)
        assert set_wait_policy(env) == {} and env == user


def test_usable_cpus_follows_affinity_and_cgroup_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path) == affinity  # no cpu.max: the affinity mask
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path) == affinity
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU of time: one thread
    assert usable_cpus(tmp_path) == 1
    code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n" \
           "from llama.common.threads import usable_cpus; print(usable_cpus())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "1", out.stderr


def test_set_torch_threads_leaves_omp_num_threads_alone():
    import torch

    before = torch.get_num_threads()
    try:
        assert set_torch_threads({"OMP_NUM_THREADS": "1"}) is None and torch.get_num_threads() == before
        assert set_torch_threads({}) == usable_cpus()
    finally:
        torch.set_num_threads(before)
