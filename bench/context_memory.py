"""Activation memory per rank under context parallelism: CP4 (4 gloo processes) against one process.

    python bench/context_memory.py --json docs/records/bench-context-memory-DATE.json

What is measured: the bytes of the distinct tensors autograd saves for backward during one training
forward (every layer, the gathered K/V, the mask blocks, the loss head), weights and inputs excluded, the
way tests/test_plan.py measures one block. The model keeps Llama 3.1 8B's proportions at a width a CPU
runs: 32 query heads and 8 K/V heads, FFN 3.5x the width, 4 layers, one 8,192-token sequence (a single
document: the causal case of long-context training). CP1 runs in this process; CP4 under torchrun, each
rank reporting its own bytes.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama import parallel  # noqa: E402
from llama.common.files import write_text  # noqa: E402
from llama.model import ModelArgs, Transformer  # noqa: E402
from llama.train.loop import loss_sum  # noqa: E402

SHAPE = dict(dim=512, n_layers=4, n_heads=32, n_kv_heads=8, hidden_dim=1792, vocab_size=8192, max_seq_len=8192)


def saved_bytes(seq: int) -> int:
    """Bytes autograd keeps for backward over one forward and loss of `seq` tokens on this rank."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**SHAPE))
    model.init_weights(0)
    tokens = torch.randint(0, SHAPE["vocab_size"], (1, seq + 1), generator=torch.Generator().manual_seed(1))
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), model.freqs_cis]}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()  # views of one tensor count once
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_sum(model, tokens[:, :-1], tokens[:, 1:])
    loss.backward()  # it runs: the saved tensors were the ones backward needs
    return sum(saved.values())


def child(seq: int, out: str) -> None:
    parallel.init_distributed(1, context_parallel_size=int(os.environ["WORLD_SIZE"]))
    mine = torch.tensor([saved_bytes(seq)], dtype=torch.float64)
    every = [torch.zeros_like(mine) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(every, mine)
    if torch.distributed.get_rank() == 0:
        Path(out).write_text(json.dumps([int(t.item()) for t in every]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--cp", type=int, default=4)
    ap.add_argument("--json", help="write the record here (docs/records/bench-context-memory-DATE.json)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.seq, args.child)
        return 0
    one = saved_bytes(args.seq)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ranks.json"
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.cp),
                        __file__, "--seq", str(args.seq), "--child", str(out)], check=True, env=env)
        ranks = json.loads(out.read_text())
    ratios = [r / one for r in ranks]
    print(f"CP1: {one / 2**20:,.1f} MiB saved for backward; CP{args.cp} per rank: "
          + ", ".join(f"{r / 2**20:,.1f}" for r in ranks) + f" MiB; largest / CP1 = {max(ratios):.3f}")
    if args.json:
        revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        record = {"date": time.strftime("%Y-%m-%d"), "revision": revision, "command": " ".join(sys.argv),
                  "shape": SHAPE, "seq_len": args.seq, "cp": args.cp, "cp1_bytes": one, "rank_bytes": ranks,
                  "max_ratio": round(max(ratios), 4)}
        write_text(args.json, json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
