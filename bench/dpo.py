"""The DPO demo (docs/dpo.md): SmolLM2-135M-Instruct + LoRA-DPO on unit conversions, on a CPU.

    python bench/dpo.py data        # writes configs/train/dpo_example.jsonl and dpo_heldout.jsonl
    python bench/dpo.py run         # trains configs/train/dpo.toml, then `python -m llama.eval compare`
                                    # base vs the run on the held-out pairs; a record in docs/records/
    python bench/dpo.py run --run-dir DIR   # no training: compares a finished run of the recipe

The data is made here and checked here: every answer is integer arithmetic (value x factor), never
the model's output. A pair is a conversion question ("Convert 7 km to m.") with the right answer
written tersely ("7 km = 7000 m") as the chosen reply, and as the rejected reply either the same
sentence with a factor off by ten ("7 km = 700 m") or a wordier reply in the small model's own habit
with a wrong factor ("7 km is 7 * 100 = 700 m."). The held-out pairs are
conversions of (value, unit) the training set never asks, all of the terse kind, so their pair
accuracy measures whether the right number is preferred, not the style. Their exact match asks more:
that the model, given the question alone, writes exactly the right terse answer.
"""

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONVERSIONS = [("km", "m", 1000), ("m", "cm", 100), ("cm", "mm", 10), ("kg", "g", 1000), ("L", "mL", 1000)]
SYSTEM = "Answer like: 3 km = 3000 m"
TRAIN, HELDOUT = ROOT / "configs/train/dpo_example.jsonl", ROOT / "configs/train/dpo_heldout.jsonl"


def wrong_factor(factor: int, rng: random.Random) -> int:
    """The factor off by ten, up or down: the slip a small model makes."""
    return factor * 10 if rng.random() < 0.5 else factor // 10


def pair(value: int, unit: str, to: str, factor: int, rng: random.Random, wordy: bool) -> dict:
    right, wrong = value * factor, value * wrong_factor(factor, rng)
    assert right == value * factor and right != wrong and right % factor == 0 and right // factor == value
    rejected = (f"{value} {unit} is {value} * {wrong // value} = {wrong} {to}." if wordy
                else f"{value} {unit} = {wrong} {to}")
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Convert {value} {unit} to {to}."}],
            "chosen": f"{value} {unit} = {right} {to}", "rejected": rejected}


def make_pairs(n_train: int = 320, n_heldout: int = 64, seed: int = 0):
    """(training pairs, held-out pairs): disjoint (value, conversion) questions; half the training
    pairs reject a wordy wrong reply, the other half and every held-out pair a terse wrong one."""
    rng = random.Random(seed)
    questions = [(v, c) for c in CONVERSIONS for v in range(2, 100)]
    rng.shuffle(questions)
    train = [pair(v, *c, rng, wordy=i % 2 == 1) for i, (v, c) in enumerate(questions[:n_train])]
    heldout = [pair(v, *c, rng, wordy=False) for v, c in questions[n_train:n_train + n_heldout]]
    return train, heldout


def write_data() -> None:
    from llama.common.files import write_text

    train, heldout = make_pairs()
    for path, pairs in ((TRAIN, train), (HELDOUT, heldout)):
        write_text(path, "".join(json.dumps(p) + "\n" for p in pairs))
        print(f"{path.relative_to(ROOT)}: {len(pairs)} pairs")


def run_demo(out: Path, overrides, run_dir=None) -> None:
    """Train the recipe (unless run_dir holds a finished run), then compare the base and the run on
    the held-out pairs; one JSON record with the run's own config."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from _host import host_facts, matvec_bandwidth
    from llama.common import assets
    from llama.common.files import write_text
    from llama.train.state import latest_checkpoint

    base = str(assets.smollm2_gguf())
    train_s = None
    if run_dir is None:
        start = time.time()
        subprocess.run([sys.executable, "train.py", "configs/train/dpo.toml", *overrides], cwd=ROOT, check=True)
        train_s, run_dir = time.time() - start, ROOT / "out/dpo"
    run_dir = Path(run_dir)
    latest = latest_checkpoint(run_dir)
    config = torch.load(latest / "train_state.00.pth", weights_only=True)["config"]
    report = out / "dpo-demo-report"
    start = time.time()
    subprocess.run([sys.executable, "-m", "llama.eval", "compare", base, str(latest), "--pairs", str(HELDOUT),
                    "--max-gen-len", "24", "--out", str(report)], cwd=ROOT, check=True)
    record = {"train_seconds": train_s, "compare_seconds": time.time() - start, "overrides": overrides, "config": config,
              "metrics": [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()],
              "report": (report / "report.md").read_text(),
              "revision": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
              "host": host_facts("cpu", torch.get_num_threads(), matvec_bandwidth("cpu"))}
    path = out / f"dpo-demo-{time.strftime('%Y-%m-%d')}.json"
    write_text(path, json.dumps(record, indent=1) + "\n")
    print(f"record: {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["data", "run"])
    p.add_argument("overrides", nargs="*", help="train.py key=value overrides for `run`")
    p.add_argument("--out", default=str(ROOT / "docs/records"))
    p.add_argument("--run-dir", help="`run` without training: a finished run of the recipe to compare")
    args = p.parse_args()
    if args.what == "data":
        write_data()
    else:
        run_demo(Path(args.out), args.overrides, args.run_dir)


if __name__ == "__main__":
    main()
