"""What the training loop reports: FLOPs per token, MFU, memory, and where the numbers go
(a tqdm bar and log lines on rank 0, out_dir/metrics.jsonl, TensorBoard when it is installed)."""

import json
import resource
import sys
from pathlib import Path

import torch

from llama.common.files import write_text
# The FLOPs count and the GPU peaks live in llama/common/flops.py, shared with the planner.
from llama.common.flops import flops_per_token, matmul_params, peak_tflops  # noqa: F401

def memory_gb(device: torch.device) -> float:
    """Peak memory: allocated by torch on a GPU; the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return kb / (1e9 if sys.platform == "darwin" else 1e6)


class MetricsLog:
    """Rank 0's record of the run. Other ranks get one with enabled=False that does nothing."""

    def __init__(self, out_dir, enabled: bool, total_steps: int, first_step: int):
        self.enabled = enabled
        self.bar = self.tb = self.file = None
        if not enabled:
            return
        path = Path(out_dir) / "metrics.jsonl"
        self._truncate_after(path, first_step)
        self.file = open(path, "a")
        try:  # TensorBoard only where it is installed: it is no dependency of ours
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=first_step + 1)
        except ImportError:
            pass
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=first_step, unit="step", dynamic_ncols=True, file=sys.stderr,
                        disable=not sys.stderr.isatty())

    @staticmethod
    def _truncate_after(path: Path, step: int) -> None:
        """A resumed run rewrites history from its checkpoint on: drop the lines past `step`."""
        if not path.is_file():
            return
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        write_text(path, "".join(line + "\n" for line in keep))  # atomic: a crash keeps the old history

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])
        self.print(format_record(record))

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        for thing in (self.bar, self.tb, self.file):
            if thing is not None:
                thing.close()


def format_record(r: dict) -> str:
    if "loss" not in r:  # an evaluation-only record
        return f"step {r['step']:>6} | val loss {r['val_loss']:.4f}"
    parts = [f"step {r['step']:>6}", f"loss {r['loss']:.4f}"]
    if "val_loss" in r:
        parts.append(f"val {r['val_loss']:.4f}")
    parts += [f"lr {r['lr']:.2e}", f"grad norm {r['grad_norm']:.3f}", f"{r['tokens_per_s']:,.0f} tok/s"]
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    parts.append(f"{r['tflops']:.3g} TFLOP/s")
    parts.append(f"mem {r['memory_gb']:.2f} GB")
    return " | ".join(parts)
