"""What a speed measurement depends on, recorded beside it (bench/generate.py): the host, its vector
flags, threads and wait policy, versions, the code revision and date, the memory bandwidth measured
in the same process; and a
CPU-bound neighbour to measure how an engine shares the cores."""

import contextlib
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from llama.common.threads import describe as thread_policy, usable_cpus


def matvec_bandwidth(device: str, repeat: int = 20) -> float:
    """GB/s of y = W x with a 256 MB fp32 W: the memory-bound kernel a decoder is made of."""
    w = torch.randn(8192, 8192, device=device)
    x = torch.randn(8192, 1, device=device)
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        (w @ x).sum().item()
        best = min(best, time.perf_counter() - start)
    return w.numel() * 4 / best / 1e9


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def versions() -> str:
    out = [f"torch {torch.__version__}"]
    for name in ("transformers", "llama_cpp"):
        try:
            out.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            pass
    return ", ".join(out)


def code_revision() -> str:
    """The commit the measured code is at (`git describe --always --dirty`), or "unknown"."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent)
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_flags() -> list:
    """The vector extensions the kernels depend on (Linux: /proc/cpuinfo's flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in VECTOR_FLAGS if f in flags]


def host_facts(device: str, threads: int, bandwidth: float) -> dict:
    """What a measured speed depends on, so that a number can be compared with another host's."""
    on_gpu = device.startswith("cuda")
    return {"device": torch.cuda.get_device_name() if on_gpu else cpu_name(), "cpu_flags": cpu_flags(),
            "usable_cpus": usable_cpus(), "threads": threads, "policy": thread_policy(),
            "load_average": [round(x, 2) for x in os.getloadavg()], "versions": versions(),
            "matvec_gbs": round(bandwidth, 2), "revision": code_revision(), "date": time.strftime("%Y-%m-%d")}


class Competitor:
    """N busy-looping processes, stopped (SIGSTOP) except inside `running()`: a CPU-bound
    neighbour that turns on for the loaded measurements only."""

    def __init__(self, n: int):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
        self._signal(signal.SIGSTOP)

    def _signal(self, sig):
        for proc in self.procs:
            proc.send_signal(sig)

    @contextlib.contextmanager
    def running(self):
        self._signal(signal.SIGCONT)
        time.sleep(0.2)  # let the scheduler see them before the measurement starts
        try:
            yield
        finally:
            self._signal(signal.SIGSTOP)

    def close(self):
        for proc in self.procs:
            proc.kill()
            proc.wait()
