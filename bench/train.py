"""Training throughput: this repo's loop against HF transformers' LlamaForCausalLM, side by side.

    flock /tmp/llama-bench.lock python bench/train.py                 # CPU: default config's shape
    flock /tmp/llama-bench.lock python bench/train.py --compile       # + ours under torch.compile
    flock /tmp/llama-bench.lock python bench/train.py --gpu           # ~1B (Llama 3.2 1B shape), bf16: tok/s + MFU
    flock /tmp/llama-bench.lock python bench/train.py --fsdp          # DDP vs FSDP, MP=2 x DP=2, ~100M params, CPU
    flock /tmp/llama-bench.lock python bench/train.py --lora          # SmolLM2 SFT on CPU: full fine-tuning vs LoRA

Both sides train the same shape on the same batches (the default corpus through llama/train/batches.py)
with the same optimizer (AdamW, same groups and hyper-parameters, foreach on CPU / fused on CUDA),
the same global-norm clipping and learning-rate schedule, the same batch and sequence length.
--lora compares this repo with itself instead: full fine-tuning vs LoRA (r=8, all seven projections)
of SmolLM2-135M-Instruct on the example chats, each in its own process (peak RSS is per process):
trainable parameters, optimizer-state bytes, peak RSS and tokens/s, side by side.
Ours is `llama.train.loop.train_step` on the Run that train.py builds; HF is the usual
`model(input_ids).logits` -> cross-entropy -> backward -> clip_grad_norm_ -> step. Rounds alternate
(ours, HF, ours, HF, ...) so background load hits both alike; each side reports its median round.
"""

import argparse
import json
import os
import resource
import subprocess
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama.common.files import write_text  # noqa: E402
from llama.train.batches import IGNORE  # noqa: E402
from llama.train.config import load_config  # noqa: E402
from llama.train.metrics import flops_per_token, peak_tflops  # noqa: E402
from train import setup  # noqa: E402  (the repository root's train.py, not this file)
from llama.train.loop import lr_at, train_step  # noqa: E402


def hf_twin(model, device, dtype=torch.float32):
    """LlamaForCausalLM of the same shape (its own random init: speed does not depend on values)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    a = model.params
    config = LlamaConfig(hidden_size=a.dim, intermediate_size=a.ffn_hidden_dim, num_hidden_layers=a.n_layers,
                         num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, head_dim=a.head_dim,
                         vocab_size=a.vocab_size, max_position_embeddings=a.max_seq_len, rope_theta=a.rope_theta,
                         rms_norm_eps=a.norm_eps, tie_word_embeddings=a.tie_word_embeddings,
                         attn_implementation="sdpa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM(config).to(device=device, dtype=dtype).train()


def hf_optimizer(model, cfg, device):
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": matrices, "weight_decay": cfg.weight_decay},
                              {"params": vectors, "weight_decay": 0.0}], lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=device.type == "cuda")


def hf_step(model, optimizer, micro_batches, step, cfg, device, autocast):
    count = sum((y != IGNORE).sum() for _, y in micro_batches).clamp(min=1).to(device)
    for x, y in micro_batches:
        with autocast():
            logits = model(input_ids=x.to(device)).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=IGNORE,
                                   reduction="sum")
        (loss / count).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss.item()  # wait for the device, as ours does


def timed_round(step_fn, batches, start: int, n: int, cfg) -> float:
    """tokens/s over n steps (the batches are fetched inside: data loading is part of a step)."""
    tokens = 0
    t0 = time.perf_counter()
    for s in range(start, start + n):
        micro = batches.train_micro_batches(s * cfg.batch_size, cfg.batch_size, cfg.micro_batch_size, 0, 1)
        step_fn(micro, s)
        tokens += sum(x.numel() for x, _ in micro)
    return tokens / (time.perf_counter() - t0)


def compare(overrides, rounds: int, steps: int, with_hf: bool = True, warmup: int = 2) -> dict:
    cfg = load_config(None, ["out_dir=out/bench", "eval_every=0", "save_every=0", *overrides])
    run = setup(cfg)
    cfg = run.cfg
    sides = {"ours": lambda micro, s: train_step(run, micro, s)}
    if with_hf:
        hf = hf_twin(run.net.model, run.device)
        opt = hf_optimizer(hf, cfg, run.device)
        sides["hf"] = lambda micro, s: hf_step(hf, opt, micro, s, cfg, run.device, run.autocast)
    results = {name: [] for name in sides}
    for name, fn in sides.items():  # warm-up: allocator, compile, first-step costs
        timed_round(fn, run.data.batches, 0, warmup, cfg)
    for r in range(rounds):
        for name, fn in sides.items():
            results[name].append(timed_round(fn, run.data.batches, warmup + r * steps, steps, cfg))
    out = {name: statistics.median(v) for name, v in results.items()}
    out["rounds"] = results
    if with_hf:  # adjacent rounds see the same background load: the per-round ratio is the robust number
        out["ratio"] = statistics.median(o / h for o, h in zip(results["ours"], results["hf"]))
    out["flops_per_token"] = flops_per_token(run.net.model.params, cfg.seq_len)
    out["peak_tflops"] = peak_tflops(run.device, cfg.peak_tflops)
    out["shape"] = {k: getattr(run.net.model.params, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")}
    out["params_M"] = sum(p.numel() for p in run.net.model.parameters()) / 1e6
    return out


LORA_RUN = ["init_from=smollm2", "data=configs/train/chat_example.jsonl", "sft=true", "val_fraction=0.1",
            "warmup_steps=1", "device=cpu", "lr=1e-4"]


def lora_side(kind: str, rounds: int, steps: int, seq: int, batch: int) -> dict:
    """One side of --lora, in this process: 'full' or 'lora' fine-tuning of SmolLM2."""
    extra = ["lora_rank=8", "lora_alpha=16"] if kind == "lora" else []
    shape = [f"seq_len={seq}", f"batch_size={batch}", f"micro_batch_size={batch}"]
    cfg = load_config(None, ["out_dir=out/bench", "eval_every=0", "save_every=0", *LORA_RUN, *shape, *extra])
    run = setup(cfg)
    step = lambda micro, s: train_step(run, micro, s)  # noqa: E731
    timed_round(step, run.data.batches, 0, 1, run.cfg)  # warm-up; creates the optimizer state
    speeds = [timed_round(step, run.data.batches, 1 + r * steps, steps, run.cfg) for r in range(rounds)]
    state = [t for s in run.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim > 0]
    return {"tokens_per_s": statistics.median(speeds), "rounds": speeds,
            "trainable": sum(p.numel() for g in run.optimizer.param_groups for p in g["params"]),
            "params": sum(p.numel() for p in run.net.model.parameters()),
            "optimizer_bytes": sum(t.numel() * t.element_size() for t in state),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def lora_compare(rounds: int, steps: int, seq: int, batch: int, repeats: int) -> dict:
    """Both sides, each in a fresh process, alternating full, lora, full, lora ... (background load)."""
    out = {"full": [], "lora": []}
    for _ in range(repeats):
        for kind in ("full", "lora"):
            done = subprocess.run([sys.executable, __file__, "--lora-side", kind, "--rounds", str(rounds),
                                   "--steps", str(steps), "--seq", str(seq), "--batch", str(batch)],
                                  capture_output=True, text=True, check=True)
            out[kind].append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = {}
    for kind, runs in out.items():
        result[kind] = dict(runs[0], tokens_per_s=statistics.median(r["tokens_per_s"] for r in runs),
                            peak_rss_bytes=max(r["peak_rss_bytes"] for r in runs), runs=runs)
    f, lo = result["full"], result["lora"]
    print(f"SmolLM2-135M SFT, CPU, {torch.get_num_threads()} threads, {batch} x {seq} tokens per step (fp32)")
    print(f"{'':24}{'full fine-tune':>18}{'LoRA r=8':>18}{'LoRA / full':>14}")
    for key, label, fmt in [("trainable", "trainable parameters", "{:,}"),
                            ("optimizer_bytes", "optimizer state (MiB)", "{:.1f}"),
                            ("peak_rss_bytes", "peak RSS (MiB)", "{:.0f}"), ("tokens_per_s", "tokens/s", "{:.0f}")]:
        scale = 1 / 2**20 if key.endswith("bytes") else 1
        a, b = f[key] * scale, lo[key] * scale
        print(f"{label:<24}{fmt.format(a):>18}{fmt.format(b):>18}{b / a:>13.3f}x")
    return result


def report(label: str, r: dict, device: str) -> None:
    line = f"{label}: ours {r['ours']:,.0f} tok/s"
    if "hf" in r:
        line += f" | HF LlamaForCausalLM {r['hf']:,.0f} tok/s | ours/HF {r['ratio']:.2f}x (median of rounds)"
    tflops = r["ours"] * r["flops_per_token"] / 1e12
    line += f" | ours {tflops:.3g} TFLOP/s"
    if r["peak_tflops"]:
        line += f" | MFU {100 * tflops / r['peak_tflops']:.1f}% of {r['peak_tflops']:.0f}"
    print(line, f"({device}, {r['params_M']:.1f}M params, {r['shape']})", flush=True)


# ~104M parameters (dim 768, 16 layers, 12 heads, 4 KV heads, FFN 2048, the default corpus's 2048-word
# BPE); short sequences so that a step takes seconds on a shared CPU.
DP_BENCH = ["device=cpu", "model_parallel_size=2", "model.dim=768", "model.n_layers=16", "model.n_heads=12",
            "model.n_kv_heads=4", "model.multiple_of=256", "seq_len=64", "batch_size=4", "micro_batch_size=2",
            "log_every=100000", "eval_every=0", "save_every=0"]


def data_parallel_rank_main(args) -> int:
    """One of the 4 ranks: a DDP run and an FSDP run of the same shape, rounds alternating."""
    from llama import parallel
    from llama.train import fsdp
    from llama.train.loop import loss_sum

    runs = {kind: setup(load_config(None, DP_BENCH + args.set + [f"out_dir=out/bench-{kind}", f"data_parallel={kind}"]))
            for kind in ("ddp", "fsdp")}
    dp, rank = parallel.data_parallel_size(), parallel.data_parallel_rank()

    def steps(run, start: int, n: int) -> float:
        cfg = run.cfg
        t0 = time.perf_counter()
        for s in range(start, start + n):
            train_step(run, run.data.batches.train_micro_batches(s * cfg.batch_size, cfg.batch_size, cfg.micro_batch_size,
                                                            rank, dp), s)
        return n * cfg.batch_size * cfg.seq_len / (time.perf_counter() - t0)  # global tokens/s

    results = {kind: [] for kind in runs}
    for kind, run in runs.items():
        steps(run, 0, 1)  # warm-up
    for r in range(args.rounds):
        for kind, run in runs.items():
            results[kind].append(steps(run, 1 + r * args.steps, args.steps))
    out = {"rounds": results, "tok_s": {k: statistics.median(v) for k, v in results.items()},
           "ratio": statistics.median(f / d for f, d in zip(results["fsdp"], results["ddp"]))}
    out["state_bytes"] = {}
    for kind, run in runs.items():  # one more backward so the gradients exist when counted
        x, y = run.data.batches.train_micro_batches(0, run.cfg.batch_size, run.cfg.micro_batch_size, rank, dp)[0]
        loss_sum(run.net.forward, x, y).backward()
        out["state_bytes"][kind] = fsdp.state_bytes(run.net.model, run.optimizer)
        run.log.close()
    out["params_M"] = sum(parallel.full_shape(n, p.shape).numel() for n, p in runs["ddp"].net.model.named_parameters()) / 1e6
    if int(os.environ["RANK"]) == 0:
        ddp_b, fsdp_b = (sum(out["state_bytes"][k].values()) for k in ("ddp", "fsdp"))
        print(f"MP=2 x DP=2, {out['params_M']:.1f}M params, fp32, CPU ({torch.get_num_threads()} threads/rank): "
              f"DDP {out['tok_s']['ddp']:,.0f} tok/s | FSDP {out['tok_s']['fsdp']:,.0f} tok/s | FSDP/DDP "
              f"{out['ratio']:.2f}x (median of rounds) | state per rank: DDP {ddp_b / 2**20:.1f} MiB, FSDP "
              f"{fsdp_b / 2**20:.1f} MiB ({fsdp_b / ddp_b:.2f}x)", flush=True)
        if args.json:
            write_text(args.json, json.dumps(out, indent=1))
    return 0


def data_parallel_main(args) -> int:
    """Under torchrun: this rank's part; otherwise start the 4 processes (torchrun) on this script."""
    if "RANK" in os.environ:
        return data_parallel_rank_main(args)
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", __file__, "--fsdp",
           "--rounds", str(args.rounds), "--steps", str(args.steps)] + (["--json", args.json] if args.json else [])
    cmd += [f"--set={kv}" for kv in args.set]
    return subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1")).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="the ~1B bf16 configuration on CUDA")
    parser.add_argument("--compile", action="store_true", help="also time ours with torch.compile")
    parser.add_argument("--no-hf", action="store_true", help="ours only (e.g. GPU MFU runs)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per round")
    parser.add_argument("--json", help="also write the numbers here")
    parser.add_argument("--fsdp", action="store_true", help="DDP vs FSDP at MP=2 x DP=2 (4 processes), ~100M params")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="--fsdp: a train config override for both sides (e.g. --set seq_len=128)")
    parser.add_argument("--lora", action="store_true", help="SmolLM2 on CPU: full fine-tuning vs LoRA")
    parser.add_argument("--lora-side", choices=["full", "lora"], help=argparse.SUPPRESS)  # one side, in-process
    parser.add_argument("--seq", type=int, default=128, help="--lora: tokens per sequence")
    parser.add_argument("--batch", type=int, default=4, help="--lora: sequences per step")
    parser.add_argument("--repeats", type=int, default=2, help="--lora: processes per side, alternating")
    args = parser.parse_args()
    if args.fsdp:
        return data_parallel_main(args)
    if args.lora_side:
        print(json.dumps(lora_side(args.lora_side, args.rounds, args.steps, args.seq, args.batch)))
        return 0
    if args.lora:
        results = lora_compare(args.rounds, args.steps, args.seq, args.batch, args.repeats)
        if args.json:
            write_text(args.json, json.dumps(results, indent=1))
        return 0
    if args.gpu and not torch.cuda.is_available():
        print("error: --gpu needs CUDA; no GPU here", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    results = {}
    if args.gpu:
        base = ["model_config=configs/models/llama3.2-1b.json", "tokenizer=llama3", "seq_len=2048",
                "batch_size=16", "micro_batch_size=8", "dtype=bfloat16", "device=cuda"]
        device = torch.cuda.get_device_name()
        results["gpu_eager"] = compare(base, args.rounds, args.steps, with_hf=not args.no_hf)
        report("1B bf16 eager", results["gpu_eager"], device)
        if args.compile:
            results["gpu_compiled"] = compare(base + ["compile=true"], args.rounds, args.steps, with_hf=False, warmup=3)
            report("1B bf16 ours compiled", results["gpu_compiled"], device)
    else:
        device = f"CPU, {torch.get_num_threads()} threads"
        results["cpu_eager"] = compare(["device=cpu"], args.rounds, args.steps)
        report("default config shape, fp32, eager vs eager", results["cpu_eager"], device)
        if args.compile:
            results["cpu_compiled"] = compare(["device=cpu", "compile=true"], args.rounds, args.steps, warmup=3)
            report("default config shape, fp32, ours compiled vs HF eager", results["cpu_compiled"], device)
    if args.json:
        write_text(args.json, json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
