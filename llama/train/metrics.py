"""What the training loop reports: FLOPs per token, MFU, memory, and where the numbers go
(a tqdm bar and log lines on rank 0, out_dir/metrics.jsonl, TensorBoard when it is installed)."""

import json
import resource
import sys
from pathlib import Path
from typing import Optional

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
    line = _format_numbers(r)
    return line + f"\nwarning: {r['warning']}" if "warning" in r else line


def _format_numbers(r: dict) -> str:
    if "loss" not in r:  # an evaluation-only record
        return f"step {r['step']:>6} | val loss {r['val_loss']:.4f}"
    parts = [f"step {r['step']:>6}", f"loss {r['loss']:.4f}"]
    if "val_loss" in r:
        parts.append(f"val {r['val_loss']:.4f}")
    if "rewards/accuracies" in r:  # DPO (llama/train/dpo.py)
        parts.append(f"reward acc {r['rewards/accuracies']:.2f} margin {r['rewards/margins']:.3f}")
    parts += [f"lr {r['lr']:.2e}", f"grad norm {r['grad_norm']:.3f}", f"{r['tokens_per_s']:,.0f} tok/s"]
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    parts.append(f"{r['tflops']:.3g} TFLOP/s")
    parts.append(f"mem {r['memory_gb']:.2f} GB")
    return " | ".join(parts)


OVERFIT_RISE = 0.01  # relative: a validation loss 1% above its lowest counts as risen, not as noise


def overfitting_warning(val_losses: dict, losses: list, first_step: int, window: int) -> Optional[str]:
    """The rule (docs/training.md): at an evaluation, over-fitting shows when the validation loss is
    more than OVERFIT_RISE above its lowest earlier value while the training loss fell over the same
    span: the mean training loss of the `window` steps up to now is below that of the `window` steps
    up to the lowest evaluation. `val_losses`: {step: val loss}, the newest last; `losses`: the
    training loss of each step from first_step + 1 on. Returns the warning line, or None."""
    *earlier, (step, val) = val_losses.items()
    if not earlier:
        return None
    best_step, best = min(earlier, key=lambda item: item[1])

    def train_mean(end: int) -> Optional[float]:  # the mean loss of steps end - window + 1 .. end
        span = losses[max(0, end - window - first_step) : end - first_step]
        return sum(span) / len(span) if span else None

    then, now = train_mean(best_step), train_mean(step)
    if then is None or now is None or val <= best * (1 + OVERFIT_RISE) or now >= then:
        return None
    return (f"over-fitting: validation loss rose {best:.4f} -> {val:.4f} since step {best_step} while the "
            f"training loss fell {then:.4f} -> {now:.4f}: it is learning its training data by heart. The "
            f"checkpoint nearest step {best_step} should generalise better; fewer steps, a lower lr or more data help")
