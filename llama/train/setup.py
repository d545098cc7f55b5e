"""The steps of a training run that train.py takes in order: checks, processes, data, model, resume.

Everything that can be checked without work is checked before any (config keys, paths, the
model-parallel size against the world size and the model's shape), so a bad run fails in a second
with one line, not after tokenizing a corpus or loading 16 GB of weights.
"""

import dataclasses
import os
import shlex
import sys
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Callable, ContextManager, Optional, Tuple

import torch
import torch.distributed as dist

from llama import parallel
from llama.common.dtypes import training_dtype
from llama.parallel import is_first_rank  # train.py's too
from llama.train import fsdp
from llama.train.batches import Batches
from llama.data.prepare import (DataError, bpe_dataset, cached_prepare, check_tokenizer, collect_files, read_meta,
                                 same_tokenizer)
from llama.model import ModelArgs, Transformer
from llama import lora
from llama.tokenizer import tokenizer_file
from llama.train import adapters as train_adapters
from llama.train.config import TrainConfig, asset_path, check_device, check_layout
from llama.train.loop import Data, Progress, Run, TrainModel, enable_activation_checkpointing
from llama.train.state import check_out_dir, claim_out_dir, latest_checkpoint, load_checkpoint, set_rng_state


def model_args(cfg: TrainConfig) -> ModelArgs:
    """The shape, known before any work: from the checkpoint to fine-tune, the config, or (for the
    vocabulary of a scratch run) the tokenizer or prepared data it will use."""
    if cfg.init_from:
        from llama.checkpoint import read_model_args

        args = read_model_args(cfg.init_from)
        args.max_seq_len, args.max_batch_size = cfg.seq_len, cfg.micro_batch_size
        return args
    vocab = None
    if cfg.tokenizer:
        from llama.tokenizer import load_tokenizer

        vocab = load_tokenizer(cfg.tokenizer).n_words
    elif (Path(cfg.data) / "meta.json").is_file():
        vocab = read_meta(cfg.data)["tokenizer"]["n_words"]
    return cfg.model_args(vocab)


def check_data(cfg: TrainConfig) -> None:
    """Missing or empty data is an error now, not after the processes and the model are up."""
    if cfg.data == "stdlib":
        return
    if (Path(cfg.data) / "meta.json").is_file():
        meta = read_meta(cfg.data)  # raises on an empty or foreign directory
        if cfg.sft and meta["kind"] != "sft":
            raise DataError(f"sft=true but {cfg.data} was prepared for {meta['kind']}: prepare it with --sft")
        if (cfg.objective == "dpo") != (meta["kind"] == "pairs"):
            raise DataError(f"{cfg.data} holds preference pairs: train it with objective=\"dpo\"" if cfg.objective != "dpo"
                            else f"objective=\"dpo\" but {cfg.data} was prepared for {meta['kind']}: prepare "
                                 f"preference pairs with --pairs")
        return
    files = collect_files([cfg.data])
    if sum(f.stat().st_size for f in files) == 0:
        raise DataError(f"data {cfg.data} is empty: nothing to train on")


def tokenizer_for(cfg: TrainConfig) -> Optional[str]:
    if cfg.tokenizer:
        return cfg.tokenizer
    if cfg.init_from:
        from llama.checkpoint import default_tokenizer_path

        path = default_tokenizer_path(cfg.init_from)
        return str(path) if path else None
    return None


def resolve_data(cfg: TrainConfig, vocab_size: int) -> Tuple[Path, Optional[str]]:
    """(prepared data dir, tokenizer path): tokenizes raw data (and trains a BPE when no tokenizer is
    given) into cfg.data_cache the first time; later runs, and the other ranks, find it there."""
    tok = tokenizer_for(cfg)
    if (Path(cfg.data) / "meta.json").is_file():
        meta = read_meta(cfg.data)
        tok = tok or meta["tokenizer"]["path"]
        check_tokenizer(cfg.data, meta, tok)  # the tokenizer that made these ids, unchanged since
        return Path(cfg.data), tok
    inputs = [cfg.data]
    if tok is None:
        if cfg.sft or cfg.objective == "dpo":
            raise DataError(f"{'sft=true' if cfg.sft else 'objective=dpo'} needs the chat model's tokenizer: "
                            f"set init_from or tokenizer")
        return bpe_dataset(inputs, cfg.data_cache, vocab_size, cfg.val_fraction)
    return cached_prepare(inputs, cfg.data_cache, tok, sft=cfg.sft, val_fraction=cfg.val_fraction,
                          pairs=cfg.objective == "dpo"), tok


def pick_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if cfg.device.startswith("cuda:"):
        return torch.device(cfg.device)
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def compute_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """The autocast dtype (llama/common/dtypes.py: auto = bf16 on CUDA, fp32 on the CPU)."""
    return training_dtype(cfg.dtype, device)


def autocast_for(cfg: TrainConfig, device: torch.device) -> Callable[[], ContextManager]:
    dtype = compute_dtype(cfg, device)
    if dtype == torch.float32:
        return nullcontext
    return partial(torch.autocast, device.type, dtype=dtype)


def build_model(cfg: TrainConfig, args: ModelArgs, device: torch.device) -> Transformer:
    """fp32 master weights: from the checkpoint to fine-tune (this rank's shard), or initialised.
    Under FSDP it is built on the CPU: sharding moves each block's shard to `device`, never the whole model."""
    if cfg.data_parallel == "fsdp":
        device = torch.device("cpu")
    if cfg.init_from:
        from llama.checkpoint import load_model

        return load_model(cfg.init_from, max_seq_len=cfg.seq_len, max_batch_size=cfg.micro_batch_size,
                          device=device, dtype=torch.float32)
    model = Transformer(args)
    model.init_weights(cfg.seed)
    return model.to(device)


def _prepare_data(cfg: TrainConfig, args: ModelArgs, is_first: bool) -> Tuple[Path, Optional[str]]:
    """Global rank 0 tokenizes (once, cached); the others wait, then find the cache."""
    if is_first:
        data_dir, tok = resolve_data(cfg, args.vocab_size)
    if dist.is_initialized():
        dist.barrier()
    if not is_first:
        data_dir, tok = resolve_data(cfg, args.vocab_size)
    meta = read_meta(data_dir)
    n_words = meta["tokenizer"]["n_words"]
    if n_words > args.vocab_size:
        raise DataError(f"{data_dir} was tokenized with {n_words} tokens but the model has vocab_size="
                        f"{args.vocab_size}: use the model's tokenizer")
    return data_dir, tok



# ---------------------------------------------------------------- the steps, in train.py's order


def check_run(cfg: TrainConfig) -> Tuple[TrainConfig, ModelArgs]:
    """(the config with its paths resolved and the micro-batch fitted to the world size, the model's
    shape): every check that needs no work (no process group, no data, no weights)."""
    # tokenizer= may name an asset, a file or a checkpoint dir: resolved as data prepare --tokenizer is
    tok = str(tokenizer_file(cfg.tokenizer, flag="tokenizer=")) if cfg.tokenizer else ""
    cfg = dataclasses.replace(cfg, init_from=asset_path(cfg.init_from), tokenizer=tok)
    check_device(cfg)  # device=cuda without a GPU: one line now, not an AttributeError after the data work
    check_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite)  # a fresh run never saves over another run
    check_init_from_tokenizer(cfg)
    args = model_args(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    _, micro = check_layout(cfg, args, world)
    cfg = dataclasses.replace(cfg, micro_batch_size=micro)
    if cfg.data_parallel == "fsdp":
        fsdp.require_fully_shard()
    if cfg.lora_rank:  # LoRA: the rank against the layers' shapes, before any work
        lora.check_model(args, cfg.lora_rank, cfg.lora_targets, cfg.model_parallel_size)
    check_data(cfg)
    return cfg, args


def check_init_from_tokenizer(cfg: TrainConfig) -> None:
    """tokenizer= with init_from must be the checkpoint's own tokenizer (the same ids): another one's
    ids index the embeddings of unrelated tokens, and the fine-tune learns noise without a word."""
    if not (cfg.init_from and cfg.tokenizer):
        return
    from llama.checkpoint import default_tokenizer_path

    own = default_tokenizer_path(cfg.init_from)
    if own is not None and not same_tokenizer(own, cfg.tokenizer):
        raise DataError(f"tokenizer={cfg.tokenizer} is not init_from's tokenizer ({own}): the model knows only "
                        f"its own ids; drop tokenizer= to use init_from's")


def claim_run_folder(cfg: TrainConfig) -> None:
    """Rank 0 locks out_dir for this run (a second run into it refuses) and, with overwrite=true,
    clears the earlier run: the last step of setup, once everything that can fail has been checked."""
    if is_first_rank():
        claim_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite)


def start_processes(cfg: TrainConfig) -> torch.device:
    """Join the torchrun job as model x context x data-parallel groups (one process: nothing to join),
    pick this rank's device, seed the RNG. Returns the device."""
    parallel.init_distributed(cfg.model_parallel_size, context_parallel_size=cfg.context_parallel_size)
    device = pick_device(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    return device


def load_data(cfg: TrainConfig, args: ModelArgs) -> Data:
    """The prepared data (tokenized once, cached), its tokenizer, and this data-parallel rank's
    memory-mapped batches; the fixed validation micro-batches when the run evaluates."""
    data_dir, tok = _prepare_data(cfg, args, is_first_rank())
    batches = Batches(data_dir, cfg.seq_len, cfg.seed, packing=cfg.packing)
    val = None
    if cfg.eval_every and batches.counts["val"]:
        val = batches.val_micro_batches(cfg.eval_batches, cfg.batch_size, cfg.micro_batch_size,
                                        parallel.data_parallel_rank(), parallel.data_parallel_size())
    return Data(dir=data_dir, tokenizer_path=tok, batches=batches, val=val)


def distribute(cfg: TrainConfig, model: Transformer, device: torch.device) -> TrainModel:
    """The model as the training step runs it: FSDP-sharded or DDP-replicated over the data-parallel
    group, blocks recomputed in backward (activation_checkpointing), compiled (compile)."""
    model.train()
    if cfg.data_parallel == "fsdp":  # each block's shard moves to the device as it is sharded
        model = fsdp.shard_model(model, device, cfg.reshard_after_forward, compute_dtype(cfg, device))
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    ddp = None
    forward = model
    if parallel.dp_cp_size() > 1 and cfg.data_parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ddp = forward = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            process_group=parallel.dp_cp_group())  # context-parallel ranks hold the same weights
    if cfg.compile:
        forward = torch.compile(forward)
    return TrainModel(model=model, forward=forward, ddp=ddp)


def resume(cfg: TrainConfig, model: Transformer, optimizer: torch.optim.Optimizer, device: torch.device) -> Progress:
    """resume=true: load the latest checkpoint's weights (or adapters), optimizer, RNG and data
    position into this run. Otherwise (or with nothing to resume) a run at step 0."""
    is_first = is_first_rank()
    checkpoint = latest_checkpoint(cfg.out_dir) if cfg.resume else None
    if checkpoint is None:
        if cfg.resume and is_first:
            print(f"resume=true but {cfg.out_dir} has no checkpoint yet: starting at step 0", file=sys.stderr)
        return Progress()
    if cfg.lora_rank:
        state = train_adapters.load_adapter_checkpoint(checkpoint, model, optimizer, device,
                                                   train_adapters.base_pointer(cfg, model))
    elif cfg.data_parallel == "fsdp" or fsdp.is_fsdp_checkpoint(checkpoint):
        state = fsdp.load_checkpoint(checkpoint, model, optimizer, device)
    else:
        state = load_checkpoint(checkpoint, model, device)
        optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    if is_first:
        print(f"resumed from {checkpoint} (step {state['step']})", file=sys.stderr)
    progress = Progress(step=state["step"], consumed=state["consumed"], first_step=state["step"])
    if "history" in state:  # checkpoints from before the history was saved start it afresh
        progress.history = state["history"]
    return progress


def describe(run: Run) -> str:
    """One line for the log: parameters, the parallel layout, the device and data (and LoRA's share)."""
    model, cfg = run.net.model, run.cfg
    mp, cp, dp = parallel.model_parallel_size(), parallel.context_parallel_size(), parallel.data_parallel_size()
    n_params = sum(parallel.full_shape(n, p.shape).numel() for n, p in model.named_parameters())
    line = (f"model {n_params / 1e6:.2f}M parameters | {mp}-way model x {f'{cp}-way context x ' if cp > 1 else ''}"
            f"{dp}-way data parallel | "
            f"{run.device} | data {run.data.dir} ({len(run.data.batches)} "
            f"{'pairs, seq_len' if run.data.batches.pairs else 'sequences of'} {cfg.seq_len})")
    if run.data.batches.fit_report:  # SFT dialogs longer than a sequence: how many were cut or dropped
        line += f"\n{run.data.batches.fit_report}"
    if cfg.lora_rank:
        trainable = sum(parallel.full_shape(n, p.shape).numel() for n, p in lora.trainable_parameters(model).items())
        line += (f"\nLoRA r={cfg.lora_rank} on {','.join(cfg.lora_targets)}: {trainable / 1e6:.3f}M trainable "
                 f"parameters ({100 * trainable / n_params:.2f}%), base frozen")
    if run.objective:
        line += "\n" + run.objective.describe()
    return line


def next_commands(cfg: TrainConfig, checkpoint) -> str:
    """What to run after this training run (train.py's closing lines): chat with a chat fine-tune
    (sft: its prompts need the chat format), sample from a text model; an adapter is merged into its
    base with --lora; a fine-tune is compared with the model it started from (docs/lora.md)."""
    q = shlex.quote
    weights = f"--ckpt-dir {q(cfg.init_from)} --lora {q(str(checkpoint))}" if cfg.lora_rank and cfg.init_from \
        else f"--ckpt-dir {q(str(checkpoint))}"
    dpo = cfg.objective == "dpo"  # preference pairs: chat-formatted, scored by compare --pairs
    lines = [f"chat with it:  python generate.py {weights} --chat" if cfg.sft or dpo else
             f"sample:        python generate.py {weights}"]
    if cfg.init_from:
        own = f" {'--pairs' if dpo else '--data'} {q(cfg.data)}" if Path(cfg.data).is_file() else ""
        lines.append(f"compare:       python -m llama.eval compare {q(cfg.init_from)} {q(str(checkpoint))}{own}")
    return "\n".join(lines)
