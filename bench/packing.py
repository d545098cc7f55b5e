"""SFT throughput: packed dialogs with document masks (packing=true) against one dialog per row.

    flock /tmp/llama-bench.lock python bench/packing.py --json docs/records/bench-packing-DATE.json

The chat corpus: one dialog per module of this Python's standard library, the user asking what the
module is for and the assistant answering with its docstring (real text, lengths from a line to
pages: cut at seq_len like any dialog), in SmolLM2's chat format with its tokenizer. The model: a
Llama of SmolLM2's vocabulary and heads, narrowed to 4 layers of width 256 so that CPU steps take
seconds. Both sides run the same optimizer step (llama.train.loop.loss_sum, backward, AdamW) at
seq_len 2048 with the same batch_size and micro_batch_size; the unpacked side pads each micro-batch to
its longest dialog (as training does). One thread, timed in CPU seconds (time.process_time), which
other processes' load hardly moves on a shared machine; rounds alternate (packed, plain, packed, ...).
Reported per side: non-padding input tokens per CPU second and trained (assistant target) tokens per
CPU second.
"""

import argparse
import ast
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._host import host_facts, matvec_bandwidth  # noqa: E402
from llama.common import assets  # noqa: E402
from llama.common.files import write_text  # noqa: E402
from llama.data.prepare import prepare, stdlib_files  # noqa: E402
from llama.model import ModelArgs, Transformer  # noqa: E402
from llama.train.batches import IGNORE, Batches  # noqa: E402
from llama.train.loop import loss_sum  # noqa: E402


def chat_corpus(path: Path, limit: int) -> int:
    """Write up to `limit` dialogs (a stdlib module's docstring as the answer); returns how many."""
    lines = []
    for f in stdlib_files():
        try:
            doc = ast.get_docstring(ast.parse(f.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if doc:
            question = {"role": "user", "content": f"What is the Python module {f.stem} for?"}
            lines.append(json.dumps({"messages": [question, {"role": "assistant", "content": doc}]}))
    path.write_text("\n".join(lines[:limit]) + "\n")
    return min(limit, len(lines))


def side(batches: Batches, model, steps: int, batch: int, micro: int, start: int):
    """(CPU seconds, non-padding input tokens, trained tokens) of `steps` optimizer steps from sequence `start`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seconds, tokens, trained = 0.0, 0, 0
    for s in range(steps):
        micro_batches = batches.train_micro_batches(start + s * batch, batch, micro, 0, 1)
        t0 = time.process_time()
        for mb in micro_batches:
            x, y, *pos = mb
            loss_sum(model, x, y, 1, pos[0] if pos else None).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.process_time() - t0
        for mb in micro_batches:
            tokens += sum(_row_length(row) for row in mb[1])
            trained += int((mb[1] != IGNORE).sum())
    return seconds, tokens, trained


def _row_length(targets: torch.Tensor) -> int:
    """A row's inputs before its padding: every dialog here ends with the assistant's reply, whose last
    target (end of turn) is trained, so the row's real tokens end at its last trained target."""
    trained = torch.nonzero(targets != IGNORE).flatten()
    return int(trained[-1]) + 1 if len(trained) else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dialogs", type=int, default=400)
    ap.add_argument("--json", help="write the record here (docs/records/bench-packing-DATE.json)")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # CPU seconds of one thread: the work, whatever else runs
    gguf = assets.smollm2_gguf()
    with tempfile.TemporaryDirectory() as tmp:
        n = chat_corpus(Path(tmp) / "chats.jsonl", args.dialogs)
        data = prepare([str(Path(tmp) / "chats.jsonl")], Path(tmp) / "data", str(gguf), sft=True, val_fraction=0.0)
        packed, plain = (Batches(data, args.seq, seed=0, packing=p) for p in (True, False))
        lengths = (packed.offsets[1:] - packed.offsets[:-1]).tolist()
        shape = ModelArgs(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=49152, multiple_of=64,
                          rope_theta=100000.0, max_seq_len=args.seq)
        model = Transformer(shape)
        model.init_weights(0)
        results = {"packed": [], "one dialog per row": []}
        for r in range(args.rounds):  # the same sequences each round for each side: comparable work
            for name, b in (("packed", packed), ("one dialog per row", plain)):
                results[name].append(side(b, model, args.steps, args.batch, args.micro, 0))
    rows = {}
    for name, runs in results.items():
        secs = statistics.median(s for s, _, _ in runs)
        _, tokens, trained = runs[0]
        rows[name] = {"cpu_seconds_per_round": round(secs, 3), "tokens_per_round": tokens, "trained_per_round": trained,
                      "tokens_per_cpu_s": round(tokens / secs, 1), "trained_tokens_per_cpu_s": round(trained / secs, 1)}
    # per-round work differs (a packed row holds several dialogs): compare rates
    ratio = rows["packed"]["tokens_per_cpu_s"] / rows["one dialog per row"]["tokens_per_cpu_s"]
    trained_ratio = rows["packed"]["trained_tokens_per_cpu_s"] / rows["one dialog per row"]["trained_tokens_per_cpu_s"]
    for name, row in rows.items():
        print(f"{name:<20} {row['tokens_per_cpu_s']:>10,.0f} tokens per CPU s  {row['trained_tokens_per_cpu_s']:>10,.0f} trained tokens per CPU s")
    print(f"packed / one dialog per row: {ratio:.2f}x tokens/s, {trained_ratio:.2f}x trained tokens/s")
    if args.json:
        revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        record = {"date": time.strftime("%Y-%m-%d"), "revision": revision, "command": " ".join(sys.argv),
                  "host": host_facts("cpu", torch.get_num_threads(), matvec_bandwidth("cpu")),
                  "dialogs": n, "dialog_tokens": {"min": min(lengths), "median": statistics.median(lengths),
                                                  "max": max(lengths)},
                  "model": {"dim": 256, "n_layers": 4, "vocab_size": 49152}, "seq_len": args.seq,
                  "batch_size": args.batch, "micro_batch_size": args.micro, "steps_per_round": args.steps,
                  "rows": rows, "tokens_per_cpu_s_ratio": round(ratio, 2), "trained_tokens_per_cpu_s_ratio": round(trained_ratio, 2)}
        write_text(args.json, json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
