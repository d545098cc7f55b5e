"""A back-of-the-envelope planner: does this model fit, and how fast can it go?

    python -m llama.plan --model configs/models/llama3.1-8b.json --mp 8 --dp 16 --seq 131072 --batch 1
    python -m llama.plan --model llama3.1-405b --mp 8 --cp 16 --dp 32 --zero 3 --seq 131072 --train --gpu h100
    python -m llama.plan --config configs/train/scale/llama3.1-70b.toml      # a training recipe's layout
    python -m llama.plan --model llama3.1-8b --lora 8 --gpu rtx4090      # LoRA fine-tuning (implies --train)

Parameters are counted from a `Transformer` built on the `meta` device (no memory, no hand-typed
counts); each rank's share follows `llama.parallel.SHARD_DIM`, the table the model itself uses.
The assumptions, each a constant below:

- weights are bf16 (2 bytes); the KV cache is bf16;
- training is mixed-precision AdamW: bf16 gradients (2 bytes/param) and fp32 master weights plus
  fp32 first and second moments (4 + 4 + 4 = 12 bytes/param), i.e. 16 bytes/param in all (the
  same total as this repository's fp32 weights + fp32 gradients + AdamW under bf16 autocast).
  Plain DDP keeps all of it on every data-parallel rank; `--zero 1/2/3` shards optimizer states /
  + gradients / + weights across the dp ranks (ZeRO, Rajbhandari et al., 2020);
- `--cp N` (context parallelism, as in Llama 3's 128K training; train.py's context_parallel_size,
  llama/parallel/context.py) splits each sequence's tokens over N GPUs: activations, the loss head,
  the KV cache and the FLOPs divide by N; weights do not, and ZeRO shards over the dp x cp GPUs that
  hold the same weights (FSDP's group there). Each layer all-gathers K and V of the whole sequence:
  the block being recomputed holds them, their copy repeated to the query heads (the CUDA kernels for
  a lower-right causal block take no GQA) and the gradients of both, 2 x (K + H) x Dh x 2 x 2 bytes
  per token of the whole sequence ("context-parallel K/V"); without checkpointing every layer keeps
  its gathered K and V;
- activations saved for backward by one block of llama/model.py, per token, with the model cast
  to bf16, SDPA/flash attention (no T x T score matrix; the kernel keeps an fp32
  log-sum-exp per head), no sequence parallelism. tests/test_plan.py measures this with autograd's
  saved-tensor hooks:
      replicated on every mp rank: 8*D + 4 for each of the two RMSNorms: its fp32 input copy
                                   (4*D), fp32 1/rms (4), bf16 normalised x (2*D), bf16 output (2*D)
      split across mp ranks:       2*(H*Dh + 2*K*Dh)  q (after RoPE), k, v
                                   + 2*H*Dh           attention output (input of wo)
                                   + 4*H              log-sum-exp
                                   + 8*F              w1 out, w3 out, silu(w1 out), product (input of w2)
  With activation checkpointing each block keeps only its bf16 input (2*D per token) and one
  block's activations are rebuilt at a time during backward;
- the loss head keeps fp32 logits (held by the training loop) and their softmax (saved by the
  cross-entropy): 8 bytes * vocab / mp per token (training never gathers the vocabulary: the loss
  is vocabulary-parallel, llama/parallel/__init__.py), / N with `--loss-chunks N` (train.py's loss_chunks:
  one slice of the sequence at a time); the final RMSNorm adds 8*D + 4 like the others. Its backward
  peaks at 12 bytes * vocab / mp per token (the saved log-softmax, its gradient and the logits'
  gradient: tests/test_plan.py measures it by peak RSS), 4 more ("loss head (backward)");
- LoRA (`--lora R`) on all seven projections: a frozen bf16 base without gradients or optimizer
  state; fp32 adapters with fp32 gradients and AdamW moments (16 bytes per adapter parameter); the
  activations of full fine-tuning (A needs the same layer inputs a weight gradient would);
- inference memory is weights + KV cache: generation.py prefills in chunks of 512 tokens and
  keeps only the last position's logits, so its activations are small next to the cache;
- decode is memory-bound: each step reads every matmul weight once plus the whole KV cache, so
  tokens/s <= batch * bandwidth / bytes; prefill and training are compute-bound at an assumed MFU;
- FLOPs: llama/common/flops.py's count, the one the training loop reports MFU with: 6*N + 12*L*H*Dh*T per
  training token (PaLM's convention: N counts the matmul weights; attention's full T x T square,
  although the causal mask halves the work a flash kernel does), a third of it for a forward pass.
  Recomputation under checkpointing is not "model" FLOPs: the MFU figure absorbs it.
"""

import argparse
import functools
import json
import sys
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llama import parallel
from llama.lora import count_lora_parameters
from llama.common.flops import GPU, GPUS, flops_per_token
from llama.model import ModelArgs, Transformer
from llama.common.errors import USER_ERRORS, UserError, report
from llama.common.files import InputFileError, read_text_file
from llama.model_args import ModelArgsError
from llama.train.config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"  # the official shapes (in a checkout)
GiB = 1024**3
PARAM_BYTES = 2  # bf16 weights
GRAD_BYTES = 2  # bf16 gradients
OPTIM_BYTES = 12  # fp32 master copy + AdamW's fp32 m and v
KV_BYTES = 2  # bf16 KV cache
HEADROOM = 0.9  # "fits" leaves 10% for the CUDA context, allocator fragmentation and temporaries
# A laptop's CPU and RAM, for --gpu laptop: 16 GiB of dual-channel DDR5-5600 (2 x 8 bytes x 5.6e9 =
# 89.6 GB/s peak); about 1 TFLOPs from 8 cores of AVX2 FMAs (prefill only). Not in the GPU table of
# llama/common/flops.py: no CUDA device reports this name.
DEVICES = {**GPUS, "laptop": GPU("laptop", "(cpu)", 16, 1.0, 0.0896)}
# Bytes per matmul weight as llama/generation/quantize.py stores them: int8 in groups of 64 with a bf16
# scale; int4 in groups of 32 with a bf16 scale and min (the embedding table stays bf16), except the
# output projection, which int4 keeps in int8 (groups of 32: HEAD_BYTES); a llama.cpp Q8_0 / Q4_0 file's
# own blocks (--quantize int8 / int4 on it), an fp16 scale per 32 (the table stays in its blocks too; a
# Q4_0 file whose output matrix is Q4_0 keeps it so: 8 bits would not restore what 4 lost).
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "int8": 1 + 2 / 64, "int4": 0.5 + 4 / 32,
                "Q8_0 file": 1 + 2 / 32, "Q4_0 file": 0.5 + 2 / 32}
HEAD_BYTES = {**WEIGHT_BYTES, "int4": 1 + 2 / 32}
MEASURED_ON_A_CPU = "docs/quantization.md#llama-31-8b-on-one-machine"  # the 8B shape measured on a 2-core VM


class PlanError(UserError):
    """Bad input to the planner: the message names the value and the fix."""


def load_model_args(path) -> ModelArgs:
    """ModelArgs from a params.json-style file, or the name of one in configs/models/ ("llama3.1-8b"),
    with errors that name the file."""
    path = Path(path)
    if not path.exists() and (CONFIGS / f"{path}.json").is_file():
        path = CONFIGS / f"{path}.json"
    try:
        fields = json.loads(read_text_file(path, "--model"))
        args = ModelArgs(**fields)
    except (FileNotFoundError, InputFileError) as e:
        if path.exists():
            raise PlanError(f"{e}: give a params.json-style model file (see configs/models/)") from None
        names = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.json")))
        raise PlanError(f"{path}: no such file; give a params.json or one of: {names}") from None
    except json.JSONDecodeError as e:
        raise PlanError(f"{path}: not valid JSON ({e})") from None
    except TypeError as e:
        raise PlanError(f"{path}: not a params.json-style model file ({e})") from None
    except ModelArgsError as e:
        raise e.at(path) from None
    if args.vocab_size <= 0:
        raise PlanError(f"{path}: vocab_size is {args.vocab_size}; set it to the tokenizer's vocabulary size")
    return args


def parameter_counts(args: ModelArgs, mp: int = 1) -> dict:
    """Parameter counts from a meta-device Transformer: 'total' (logical model), 'matmul' (what a
    forward pass multiplies by: all but the embedding lookup) and the same two per mp rank."""
    check_model_parallel(args, mp)
    kv_copies = parallel.kv_heads_for(args.n_kv_heads, mp) // args.n_kv_heads  # duplicated when mp > K
    counts = dict(total=0, matmul=0, total_per_rank=0, matmul_per_rank=0)
    for name, n in _parameter_sizes(json.dumps(asdict(args), sort_keys=True)):
        local = n if parallel.shard_dim(name) is None else n // mp
        if name.endswith(("attention.wk.weight", "attention.wv.weight")):
            local *= kv_copies
        is_lookup = name == "tok_embeddings.weight" and not args.tie_word_embeddings
        counts["total"] += n
        counts["total_per_rank"] += local
        counts["matmul"] += 0 if is_lookup else n
        counts["matmul_per_rank"] += 0 if is_lookup else local
    return counts


@functools.lru_cache(maxsize=32)
def _parameter_sizes(args_json: str):
    """(name, numel) of every parameter; a tied table appears once, under tok_embeddings."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = Transformer(ModelArgs(**json.loads(args_json)))
    return tuple((name, p.numel()) for name, p in model.named_parameters())


def check_model_parallel(args: ModelArgs, mp: int, training: bool = False) -> None:
    """The rules the model itself enforces (llama.parallel.check_model_parallel), as planner errors:
    training also refuses more ranks than K/V heads, as train.py does."""
    try:
        parallel.check_model_parallel(args, mp, training=training, flag="--mp ")
    except parallel.ParallelError as e:
        raise PlanError(str(e)) from None


def kv_cache_bytes(args: ModelArgs, batch: int, seq: int, mp: int = 1) -> int:
    """Bytes of K and V for every layer on one mp rank: 2 * L * B * S * (K'/mp) * Dh * 2 bytes,
    where K' = max(K, mp): past K ranks each keeps a copy of its query heads' K/V head."""
    kv_local = parallel.kv_heads_for(args.n_kv_heads, mp) // mp
    return 2 * args.n_layers * batch * seq * kv_local * args.head_dim * KV_BYTES


def activation_bytes_per_token(args: ModelArgs, mp: int = 1) -> int:
    """bf16 activations one block saves for backward, per token, on one mp rank (see the top)."""
    D, H, Dh, F = args.dim, args.n_heads, args.head_dim, args.ffn_hidden_dim
    K = parallel.kv_heads_for(args.n_kv_heads, mp)
    replicated = 2 * (8 * D + 4)
    split = 2 * (H * Dh + 2 * K * Dh) + 2 * H * Dh + 4 * H + 8 * F
    return replicated + split // mp


def training_flops(args: ModelArgs, batch: int, seq: int) -> float:
    """Model FLOPs for one forward+backward over `batch` sequences of `seq` tokens (llama/common/flops.py)."""
    return flops_per_token(args, seq) * batch * seq


@dataclass
class Plan:
    args: ModelArgs
    gpu: GPU
    mp: int
    dp: int
    seq: int
    batch: int
    train: bool
    zero: int
    cp: int
    mfu: float
    params: dict
    memory: dict  # name -> bytes per GPU, in the order printed
    total_bytes: int  # the configuration that counts for "fits" (checkpointed when training)
    fits: bool
    speed: dict  # name -> (value, unit)
    lora: int = 0  # the LoRA rank (0: full fine-tuning)
    loss_chunks: int = 1


def make_plan(args: ModelArgs, mp=1, dp=1, seq=8192, batch=1, train=False, gpu="h100", zero=0, mfu=0.4,
              cp=1, lora=0, loss_chunks=1) -> Plan:
    """Everything the CLI prints, as numbers (bytes, seconds) a notebook can plot."""
    if gpu not in DEVICES:
        raise PlanError(f"--gpu {gpu!r} is not known: choose one of {', '.join(DEVICES)}")
    for flag, value in (("--dp", dp), ("--cp", cp), ("--seq", seq), ("--batch", batch)):
        if value < 1:
            raise PlanError(f"{flag} {value}: must be at least 1")
    if zero not in (0, 1, 2, 3):
        raise PlanError(f"--zero {zero}: choose 0 (plain DDP), 1, 2 or 3")
    if seq % cp != 0:
        raise PlanError(f"--cp {cp} does not divide --seq {seq}: each context-parallel rank takes an equal slice")
    if loss_chunks < 1:
        raise PlanError(f"--loss-chunks {loss_chunks}: must be at least 1")
    if lora < 0:
        raise PlanError(f"--lora {lora}: the LoRA rank must be positive (8 or 16 are usual)")
    train = train or lora > 0
    if train:
        check_model_parallel(args, mp, training=True)
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu {mfu}: a fraction in (0, 1], e.g. 0.4")
    g = DEVICES[gpu]
    counts = parameter_counts(args, mp)
    n_local = counts["total_per_rank"]
    memory, speed = {}, {}
    if train:
        shard = lambda stage: dp * cp if zero >= stage else 1  # noqa: E731 - CP ranks hold the same weights
        per_token = activation_bytes_per_token(args, mp)
        tokens = batch * seq // cp  # this GPU's slice of the sequences
        memory["weights"] = n_local * PARAM_BYTES // shard(3)
        memory["gradients"] = n_local * GRAD_BYTES // shard(2)
        memory["optimizer"] = n_local * OPTIM_BYTES // shard(1)
        if lora:  # a frozen bf16 base; fp32 adapters with fp32 gradients and AdamW moments
            adapters, counts["lora"] = count_lora_parameters(args, lora, mp=mp), count_lora_parameters(args, lora)
            memory["weights"] = n_local * PARAM_BYTES // shard(3) + adapters * 4 // shard(3)
            memory["gradients"] = adapters * 4 // shard(2)
            memory["optimizer"] = adapters * 8 // shard(1)
        memory["activations"] = args.n_layers * per_token * tokens
        memory["activations (checkpointed)"] = (args.n_layers * 2 * args.dim + per_token) * tokens
        memory["loss head"] = (8 * args.vocab_size // mp // loss_chunks + 8 * args.dim + 4) * tokens
        # its backward: the saved log-softmax plus two fp32 gradients (of the log-probabilities and of
        # the logits), 12 bytes x vocab per token where the forward counted 8 (measured: tests/test_plan.py)
        memory["loss head (backward)"] = 4 * args.vocab_size // mp // loss_chunks * tokens
        states = memory["weights"] + memory["gradients"] + memory["optimizer"] + memory["loss head"]
        states += memory["loss head (backward)"]
        gathered = 0
        if cp > 1:  # the whole sequence's K and V on every CP rank (bf16)
            K, H = parallel.kv_heads_for(args.n_kv_heads, mp) // mp, args.n_heads // mp
            gathered = batch * seq * 2 * K * args.head_dim * 2
            memory["context-parallel K/V"] = 2 * batch * seq * 2 * (K + H) * args.head_dim * 2
        memory["total"] = states + memory["activations"] + args.n_layers * gathered
        memory["total (checkpointed)"] = states + memory["activations (checkpointed)"] + memory.get("context-parallel K/V", 0)
        total = memory["total (checkpointed)"]
        flops = training_flops(args, batch, seq) / (mp * cp)  # per GPU
        if lora:  # frozen weights: backward computes input gradients only (2N, not 4N, per token)
            flops -= 2 * counts["matmul"] * batch * seq / (mp * cp)
        step = flops / (g.bf16_tflops * 1e12 * mfu)
        speed["step time"] = (step, "s")
        speed["training tokens/s (all GPUs)"] = (batch * seq * dp / step, "tok/s")
    else:
        memory["weights"] = n_local * PARAM_BYTES
        memory["KV cache"] = kv_cache_bytes(args, batch, seq, mp) // cp
        memory["total"] = total = memory["weights"] + memory["KV cache"]
        # prefill: the forward third of the training FLOPs
        prefill = training_flops(args, batch, seq) / 3 / (mp * cp)
        speed["prefill time"] = (prefill / (g.bf16_tflops * 1e12 * mfu), "s")
        read = counts["matmul_per_rank"] * PARAM_BYTES + memory["KV cache"]
        speed["decode tokens/s (per replica, full cache)"] = (batch * g.bandwidth_tbs * 1e12 / read, "tok/s")
        speed["decode tokens/s (all replicas)"] = (dp * batch * g.bandwidth_tbs * 1e12 / read, "tok/s")
        head = args.vocab_size * args.dim // mp  # the output projection's weights on this rank
        for precision, nbytes in WEIGHT_BYTES.items():  # --quantize: what fewer bytes per weight buy
            embedding = counts["total_per_rank"] - counts["matmul_per_rank"]  # a lookup reads a row of it
            table = nbytes if "file" in precision else max(nbytes, PARAM_BYTES)
            matmul = (counts["matmul_per_rank"] - head) * nbytes + head * HEAD_BYTES[precision]
            memory[f"weights {precision}"] = int(matmul + embedding * table)
            speed[f"decode tokens/s, {precision} weights"] = \
                (batch * g.bandwidth_tbs * 1e12 / (matmul + memory["KV cache"]), "tok/s")
    fits = total <= HEADROOM * g.memory_gib * GiB
    return Plan(args, g, mp, dp, seq, batch, train, zero, cp, mfu, counts, memory, total, fits, speed, lora,
                loss_chunks)


def plan_training_config(path, gpu: str = "h100", mfu: float = 0.4) -> Plan:
    """The plan for a train.py recipe's layout: model_parallel_size x context_parallel_size x
    data_parallel_size, ddp or fsdp (ZeRO-3 over data x context parallel; ZeRO-2 with
    reshard_after_forward = false), micro_batch_size x seq_len tokens per forward, loss_chunks. The shape comes from init_from (its params.json when the weights are here, else the
    official shape its directory is named after: .../Llama3.1-70B -> configs/models/llama3.1-70b.json)
    or from model_config and [model]."""
    if not Path(path).exists():
        raise PlanError(f"--config {path}: no such file (see configs/train/)")
    try:
        cfg = TrainConfig(**tomllib.loads(read_text_file(path, "--config")))
    except (tomllib.TOMLDecodeError, TypeError) as e:
        raise PlanError(f"--config {path}: not a train.py config ({e})") from None
    if cfg.init_from and (Path(cfg.init_from) / "params.json").is_file():
        args = load_model_args(Path(cfg.init_from) / "params.json")
    elif cfg.init_from:
        args = load_model_args(Path(cfg.init_from).name.lower())
    else:
        args = cfg.model_args()
        if args.vocab_size <= 0:
            raise PlanError(f"--config {path}: set model.vocab_size (the tokenizer's) to plan it")
    zero = 0 if cfg.data_parallel == "ddp" else (3 if cfg.reshard_after_forward else 2)
    return make_plan(args, mp=cfg.model_parallel_size, dp=max(1, cfg.data_parallel_size), seq=cfg.seq_len,
                     batch=cfg.micro_batch_size, train=True, gpu=gpu, zero=zero, mfu=mfu,
                     cp=cfg.context_parallel_size, loss_chunks=cfg.loss_chunks)


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def format_plan(p: Plan, name: str = "model") -> str:
    a = p.args
    lines = [
        f"{name}: {p.params['total']:,} parameters ({p.params['total_per_rank']:,} per GPU), "
        f"{a.n_layers} layers, dim {a.dim}, {a.n_heads} heads, {a.n_kv_heads} KV heads, FFN {a.ffn_hidden_dim}",
        f"{p.mp * p.cp * p.dp} x {p.gpu.name} ({p.gpu.memory_gib:g} GiB, {p.gpu.bf16_tflops:g} TFLOPs bf16, "
        f"{p.gpu.bandwidth_tbs:g} TB/s): mp {p.mp} x cp {p.cp} x dp {p.dp}; {p.batch} x {p.seq:,} tokens per "
        + ("data-parallel rank, training" + (f", ZeRO-{p.zero}" if p.zero else ", plain DDP") if p.train
           else "replica, inference"),
        "",
        "memory per GPU",
    ]
    if p.lora:
        lines[-1:-1] = [f"LoRA r={p.lora} on wq wk wv wo w1 w2 w3: {p.params['lora']:,} trainable parameters "
                        f"({100 * p.params['lora'] / p.params['total']:.2f}%), base frozen in bf16", ""]
    for key, value in p.memory.items():
        lines.append(f"  {key:<28}{human_bytes(value):>14}")
    budget = HEADROOM * p.gpu.memory_gib
    which = "with checkpointing " if p.train else ""
    verdict = "fits" if p.fits else "does NOT fit"
    lines += ["", f"{verdict}: {human_bytes(p.total_bytes)} {which}vs {budget:.1f} GiB usable "
              f"({HEADROOM:.0%} of {p.gpu.memory_gib:g})"]
    if p.train:
        without = p.memory["total"] <= HEADROOM * p.gpu.memory_gib * GiB
        lines.append(f"without checkpointing: {human_bytes(p.memory['total'])} ({'fits' if without else 'does NOT fit'})")
        if p.loss_chunks == 1 and not p.fits:  # the loss head is often what tips it: say what chunking gives
            chunked = make_plan(p.args, p.mp, p.dp, p.seq, p.batch, p.train, p.gpu.name, p.zero, p.mfu, p.cp, p.lora, 8)
            lines.append(f"with --loss-chunks 8 (loss_chunks=8 in train.py): {human_bytes(chunked.total_bytes)} "
                         f"({'fits' if chunked.fits else 'does NOT fit'})")
    lines.append("")
    for key, (value, unit) in p.speed.items():
        lines.append(f"  {key:<42}{value:>14,.0f} {unit}" if value >= 100 else f"  {key:<42}{value:>14.3g} {unit}")
    bound = "" if p.train else "; decode bound by memory bandwidth"
    lines.append(f"  (compute at {p.mfu:.0%} MFU{bound}; communication ignored)")
    if p.gpu.name == "laptop" and not p.train:
        lines.append(f"  measured on a CPU (Llama 3.1 8B's shape, int8/int4 beside llama.cpp): {MEASURED_ON_A_CPU}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llama.plan", description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="params.json-style file, or a name from configs/models/ such as llama3.1-8b")
    ap.add_argument("--config", help="a train.py recipe (configs/train/...): plan its training layout")
    ap.add_argument("--mp", type=int, default=1, help="model-parallel (tensor-parallel) GPUs per replica")
    ap.add_argument("--dp", type=int, default=1, help="data-parallel replicas")
    ap.add_argument("--cp", type=int, default=1, help="context-parallel GPUs sharing each sequence")
    ap.add_argument("--seq", type=int, default=8192, help="tokens per sequence")
    ap.add_argument("--batch", type=int, default=1, help="sequences per replica")
    ap.add_argument("--train", action="store_true", help="plan a training step instead of inference")
    ap.add_argument("--gpu", default="h100", help=f"one of {', '.join(DEVICES)}")
    ap.add_argument("--zero", type=int, default=0, help="ZeRO stage across dp ranks (0: plain DDP)")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation")
    ap.add_argument("--lora", type=int, default=0, metavar="R", help="LoRA fine-tuning at rank R (implies --train)")
    ap.add_argument("--loss-chunks", type=int, default=1, metavar="N",
                    help="output layer + loss over N slices of the sequence (train.py's loss_chunks)")
    opts = ap.parse_args(argv)
    try:
        if opts.config:
            p, name = plan_training_config(opts.config, opts.gpu, opts.mfu), Path(opts.config).stem
        elif opts.model:
            args, name = load_model_args(opts.model), Path(opts.model).stem
            p = make_plan(args, opts.mp, opts.dp, opts.seq, opts.batch, opts.train, opts.gpu, opts.zero, opts.mfu,
                          opts.cp, opts.lora, opts.loss_chunks)
        else:
            raise PlanError("give --model (a params.json or a name such as llama3.1-8b) or --config (a train.py recipe)")
    except USER_ERRORS as e:  # bad input or a missing path: one line; anything else is a bug's traceback
        return report(e)
    try:
        print(format_plan(p, name))
    except BrokenPipeError:  # `| head`: the reader has seen enough
        sys.stderr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
