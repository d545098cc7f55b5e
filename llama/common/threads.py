"""CPU threads for the command lines (generate.py, train.py, bench/): how many, and how they wait.

Both are process-wide, so only entry points call these functions; importing llama changes
nothing. This module imports no torch: the wait policy must be in the environment before torch
loads its OpenMP runtime (libgomp reads OMP_WAIT_POLICY and GOMP_SPINCOUNT once, when loaded).

Why: torch's CPU kernels run in OpenMP parallel regions that end in a barrier. By default a
thread that reaches the barrier first spins (libgomp: 300,000 rounds, milliseconds) before it
sleeps. On a quiet machine that saves a wake-up per region; on a shared one the spinning thread
burns the core that the thread it waits for needs, and a compiled decode step has ~200 regions.
So unless the user chose otherwise, waiting threads sleep at once (OMP_WAIT_POLICY=PASSIVE), and
the thread count is the CPUs this process may actually use (affinity mask and cgroup quota), not
the machine's core count. docs/performance.md has the measurements, quiet and with a competing
process.
"""

import math
import os
from pathlib import Path
from typing import Dict, MutableMapping, Optional

# What an entry point sets when the user has set none of the wait variables.
WAIT_POLICY = {"OMP_WAIT_POLICY": "PASSIVE"}
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
POLICY_HELP = ("CPU threads: as many as the CPUs this process may use (affinity mask, cgroup quota), unless "
               "OMP_NUM_THREADS is set; waiting threads sleep at once (OMP_WAIT_POLICY=PASSIVE) unless "
               "OMP_WAIT_POLICY or GOMP_SPINCOUNT is set: on a shared CPU spinning threads take the cores "
               "the others need. See docs/performance.md.")


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may run on: its affinity mask (taskset, cpusets), capped by a cgroup v2
    CPU quota (`docker --cpus 1.5` gives 2: a quota is time, not cores, so round up)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota readable: the affinity mask is all we know
    return cpus


def set_wait_policy(environ: MutableMapping[str, str] = os.environ) -> Dict[str, str]:
    """Put WAIT_POLICY into the environment unless the user set any wait variable. Call it before
    torch is imported (later, the OpenMP runtime has already read its settings). Returns what it set."""
    if any(name in environ for name in WAIT_VARIABLES):
        return {}
    environ.update(WAIT_POLICY)
    return dict(WAIT_POLICY)


def set_torch_threads(environ: MutableMapping[str, str] = os.environ) -> Optional[int]:
    """torch.set_num_threads(usable_cpus()) unless OMP_NUM_THREADS is set (by the user, or by
    torchrun, which gives each of its processes one thread). Returns the count it set, or None."""
    if environ.get("OMP_NUM_THREADS"):
        return None
    import torch

    torch.set_num_threads(usable_cpus())
    return torch.get_num_threads()


def describe() -> str:
    """One line for --help and logs: the policy as this process runs it."""
    wait = ", ".join(f"{k}={os.environ[k]}" for k in WAIT_VARIABLES if k in os.environ) or "OpenMP's default"
    threads = os.environ.get("OMP_NUM_THREADS") or f"{usable_cpus()} (the CPUs this process may use)"
    return f"threads {threads}; waiting {wait}"
