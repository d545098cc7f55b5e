"""The training loop: model parallel (Fairscale) x data parallel (DDP or FSDP), AdamW, exact resume.

One optimizer step:
  1. this data-parallel rank's micro-batches of the global batch (llama/train/batches.py);
  2. forward + backward for each, under bf16 autocast on CUDA; DDP all-reduces (FSDP
     reduce-scatters, llama/train/fsdp.py) the gradients over the data-parallel group on the last
     micro-batch only; under model parallelism the loss comes from each rank's vocabulary slice;
  3. the loss is a sum over trained target tokens divided by their count over the whole global
     batch, so accumulation, data parallelism and SFT masks all give the single-process mean;
  4. clip by the global gradient norm, set the scheduled learning rate, step AdamW.
`Run` is the state it works on, in typed pieces: the model (`TrainModel`), the data (`Data`), how
far it got (`Progress`). train.py builds one (config -> processes -> data -> model -> optimizer ->
resume, with the steps in llama/train/setup.py), runs `loop` and saves the final checkpoint.
"""

import functools
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, List, Optional, Tuple

import torch
import torch.distributed as dist

from llama import lora, parallel
from llama.model import Transformer
from llama.train import fsdp
from llama.train.batches import IGNORE, Batches
from llama.parallel import context
from llama.parallel.loss import vocab_parallel_cross_entropy
from llama.eval.perplexity import perplexity
from llama.train.config import TrainConfig
from llama.train.adapters import base_pointer, save_adapter_checkpoint
from llama.train.metrics import MetricsLog, flops_per_token, memory_gb, overfitting_warning
from llama.train.state import latest_checkpoint, rng_state, save_checkpoint
from llama.common.errors import UserError

# (inputs, targets), each (B, T) int64; packed documents add their RoPE positions (B, T) (llama/train/batches.py)
MicroBatch = Tuple[torch.Tensor, ...]


@dataclass
class TrainModel:
    """The model as the training step runs it."""
    model: Transformer  # this rank's shard (FSDP-sharded in place under fsdp): names, saving, evaluation
    forward: Callable[..., torch.Tensor]  # what the step calls: model, DDP(model), or their compiled form
    ddp: Optional[torch.nn.parallel.DistributedDataParallel]  # the DDP wrapper (for no_sync), else None


@dataclass
class Data:
    """Where the tokens come from."""
    dir: Path  # the prepared data (meta.json + uint32 shards)
    tokenizer_path: Optional[str]  # copied into every checkpoint
    batches: Batches  # the memory-mapped sequences; each data-parallel rank reads its rows of a batch
    val: Optional[List[MicroBatch]]  # the fixed held-out micro-batches; None when the run does not evaluate


@dataclass
class Progress:
    """How far the run got (step and consumed go into every checkpoint and come back on resume)."""
    step: int = 0  # optimizer steps done
    consumed: int = 0  # training sequences consumed so far: the data position
    first_step: int = 0  # the step this process started at (a resumed run: the checkpoint's)
    saved_any: bool = False  # has this process saved a checkpoint yet
    # what the over-fitting warning reads, from step 1 on (saved with the checkpoint, so a resumed run
    # warns exactly where the uninterrupted one does): every step's loss, {step: val loss}, warned yet
    history: dict = field(default_factory=lambda: {"losses": [], "val_losses": {}, "warned": False})


@dataclass
class Run:
    """Everything the loop reads and updates, built by train.py's setup()."""
    cfg: TrainConfig
    device: torch.device
    autocast: Callable[[], ContextManager]  # () -> bf16/fp16 autocast on CUDA, or a no-op
    data: Data
    net: TrainModel
    optimizer: torch.optim.Optimizer
    progress: Progress
    log: MetricsLog
    peak_tflops: Optional[float]  # the device's peak, for MFU (None: unknown, no MFU)
    objective: Optional[Any] = None  # preference pairs (llama/train/dpo.py's Preference); None: next-token loss


class TrainingError(UserError, RuntimeError):
    """The run cannot go on (diverged loss, ...): the message says why and what was kept."""


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine decay to min_lr at decay_steps (default: max_steps);
    step is 0-based."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    horizon = cfg.decay_steps or cfg.max_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, horizon - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices (embeddings, projections) and none on the RMSNorm
    gains: decaying a gain towards 0 would shrink activations, not regularise. Only parameters that
    train: with LoRA, the adapters alone (the frozen base needs no optimizer state)."""
    matrices, vectors = [], []
    for p in model.parameters():  # a tied output/embedding weight is listed once
        if p.requires_grad:
            (matrices if p.ndim >= 2 else vectors).append(p)
    groups = [{"params": matrices, "weight_decay": cfg.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                                  fused=device.type == "cuda")
    if cfg.lora_rank:
        lora.check_only_adapters_train(model, optimizer)
    return optimizer


def global_grad_norm(model) -> torch.Tensor:
    """The L2 norm of the whole model's gradient, identical on every rank. A sharded tensor's
    squares are summed over the model-parallel group; a replicated one (the RMSNorm gains, whose
    gradient is the same on every model-parallel rank) is counted once. DDP already averaged over
    the data-parallel group; under FSDP each data-parallel rank holds a piece of every gradient,
    so both sums are first added up over the data-parallel group."""
    sharded, replicated = [], []
    for name, p in model.named_parameters():
        if p.grad is not None:
            (sharded if parallel.shard_dim(name) is not None else replicated).append(fsdp.local(p.grad.detach()))
    zero = torch.zeros((), device=fsdp.local(next(model.parameters())).device)

    def sum_of_squares(grads):  # one fused kernel per dtype/device group, as clip_grad_norm_ does
        return torch.stack(torch._foreach_norm(grads)).float().square().sum() if grads else zero

    squares = torch.stack([sum_of_squares(sharded), sum_of_squares(replicated)])  # (split, replicated)
    if fsdp.is_sharded(model) and parallel.dp_cp_size() > 1:  # FSDP shards over data x context parallel
        dist.all_reduce(squares, group=parallel.dp_cp_group())
    if parallel.model_parallel_size() > 1:
        dist.all_reduce(squares[0], group=parallel.model_parallel_group())
    return squares.sum().sqrt()


def clip_gradients(model, norm: torch.Tensor, max_norm: float) -> None:
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_([fsdp.local(p.grad) for p in model.parameters() if p.grad is not None], scale)


def enable_activation_checkpointing(model) -> None:
    """Keep only each block's input in forward and recompute the block in backward. Patching the
    instance's forward keeps the state-dict keys (and so the checkpoint layout) unchanged."""
    for layer in model.layers:
        layer.forward = functools.partial(torch.utils.checkpoint.checkpoint, layer.forward, use_reentrant=False)


def dp_all_reduce(t: torch.Tensor, context: bool = False) -> torch.Tensor:
    """Sum over the data-parallel ranks (context=True: and the context-parallel ones, which hold other
    tokens of the same rows: a loss; a count of the rows' targets is the same on each)."""
    if (parallel.dp_cp_size() if context else parallel.data_parallel_size()) > 1:
        dist.all_reduce(t, group=parallel.dp_cp_group() if context else parallel.data_parallel_group())
    return t


def loss_sum(forward, inputs: torch.Tensor, targets: torch.Tensor, chunks: int = 1,
             positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Summed cross-entropy over the trained targets (IGNORE marks the rest). (B, T) -> ().
    The loss is the model's head (`head_loss`), so it runs inside the model's forward: there FSDP has
    gathered the final norm and output weights (a tied table lives with the root module, gathered only
    around the root's forward), and DDP sees one forward. chunks: `loss_chunks`. positions (B, T):
    packed documents; under context parallelism this rank's share of the tokens (llama/parallel/context.py),
    whose loss the caller sums over the context-parallel ranks."""
    inputs, targets, layout = context.shard_batch(inputs, targets, positions, IGNORE)  # {}: one causal sequence per row
    return forward(inputs, head=functools.partial(head_loss, targets=targets, chunks=chunks), **layout)


def head_loss(model, h: torch.Tensor, targets: torch.Tensor, chunks: int = 1, per_row: bool = False) -> torch.Tensor:
    """The summed loss of the final residual stream h (B, T, D) against targets (B, T), from the
    model's one output head (`Transformer.logits`): under model parallelism each rank's vocabulary
    slice of the logits goes to the vocabulary-parallel cross-entropy, never the full (B, T, vocab).
    per_row: each row's sum (B,) instead (DPO's reply log-probabilities, llama/train/dpo.py).

    chunks > 1: the fp32 logits and their log-softmax cost 8 x vocab bytes per token (8 GiB for 8K
    tokens of Llama 3's 128K vocabulary). Instead the head and the loss run on one slice of the
    sequence at a time, each recomputed in backward, so only one slice's logits are ever alive.
    Same sum, same gradients."""
    if chunks <= 1:
        return _slice_loss(model, h, targets, per_row)
    total = torch.zeros(h.shape[0] if per_row else (), device=h.device)
    for h_slice, y_slice in zip(h.chunk(chunks, dim=1), targets.chunk(chunks, dim=1)):
        total = total + torch.utils.checkpoint.checkpoint(_slice_loss, model, h_slice, y_slice, per_row,
                                                          use_reentrant=False)
    return total


def _slice_loss(model, h: torch.Tensor, targets: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    logits = model.logits(h)  # (B, T/chunks, V / model-parallel size) float32
    nll = vocab_parallel_cross_entropy(logits.flatten(0, 1), targets.flatten(), IGNORE)  # (B * T/chunks,)
    return nll.view(targets.shape).sum(dim=1) if per_row else nll.sum()


def grad_sync(net: TrainModel, sync: bool) -> ContextManager:
    """Reduce gradients over the data-parallel group on this micro-batch? DDP: no_sync() around
    the forward; FSDP: a flag its backward reads (no reduce-scatter until the last micro-batch)."""
    if fsdp.is_sharded(net.model):
        net.model.set_requires_gradient_sync(sync)
        return nullcontext()
    return net.ddp.no_sync() if net.ddp is not None and not sync else nullcontext()


def _on(device, batch: MicroBatch):
    """(inputs, targets, positions or None) of a micro-batch, on `device`."""
    x, y, *pos = (t.to(device, non_blocking=True) for t in batch)
    return x, y, (pos[0] if pos else None)


def train_step(run: Run, micro_batches: List[MicroBatch], step: int) -> Tuple[float, float, float]:
    """One optimizer step over this rank's micro-batches; returns (loss, grad norm, lr) as floats."""
    device, objective = run.device, run.objective
    # what the loss is a mean over: trained tokens, or (DPO) pairs
    count = objective.count(micro_batches, device) if objective else sum((b[1] != IGNORE).sum() for b in micro_batches)
    count = dp_all_reduce(count.to(device, torch.float32))
    # DDP and FSDP average gradients over data x context-parallel ranks; scaling by their number / count
    # makes the result sum/count.
    scale = parallel.dp_cp_size() / count.clamp(min=1.0)
    total = torch.zeros((), device=device)
    dp = parallel.data_parallel_size()
    rows = run.data.batches.train_rows(run.progress.consumed, run.cfg.batch_size, parallel.data_parallel_rank(), dp)
    for i, batch in enumerate(micro_batches):
        sync = i == len(micro_batches) - 1
        x, y, pos = _on(device, batch)
        n = len(x) // run.data.batches.per_item  # training items (sequences, or DPO's pairs) in this micro-batch
        # LoRA dropout: the masks of these rows' places in the run, on any layout (forward and recompute)
        with lora.dropout_rows(run.net.model, run.data.batches.row_numbers(rows[:n]), run.cfg.seed, run.cfg.seq_len,
                               context.token_index(x.shape[1])):
            with grad_sync(run.net, sync), run.autocast():
                if objective:  # no packing or context parallelism with DPO (config.py refuses them)
                    summed = objective.loss_sum(run.net.forward, x, y)
                else:
                    summed = loss_sum(run.net.forward, x, y, run.cfg.loss_chunks, pos)
            (summed * scale).backward()
        rows = rows[n:]
        total += summed.detach()
    loss = (dp_all_reduce(total, context=True) / count.clamp(min=1.0)).item()
    if objective:
        objective.finish_step(count)  # its statistics (rewards, accuracy, log-probabilities), for the log
    norm = global_grad_norm(run.net.model)
    if not (math.isfinite(loss) and torch.isfinite(norm).item()):
        kept = latest_checkpoint(run.cfg.out_dir) if run.progress.saved_any else None
        raise TrainingError(
            f"loss is {loss} (grad norm {norm.item()}) at step {step + 1}: stopping without saving; "
            f"the last good checkpoint is {kept or 'none (no checkpoint was saved in this run)'}; "
            f"lower lr or check the data")
    clip_gradients(run.net.model, norm, run.cfg.grad_clip)
    lr = lr_at(step, run.cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss, norm.item(), lr


@torch.no_grad()
def evaluate(run: Run) -> Optional[float]:
    """Mean loss over the fixed held-out batches, or None. Every data-parallel rank runs the same number
    of forwards (a rank short of rows pads with zero-weight batches: llama/train/batches.py), since
    under FSDP each forward is a collective."""
    if run.data.val is None:
        return None
    if run.objective:
        return run.objective.evaluate(run)
    model = run.net.model
    model.eval()
    sums = torch.zeros(2, device=run.device)  # (summed loss, trained tokens)
    for batch in run.data.val:
        x, y, pos = _on(run.device, batch)
        with run.autocast():
            sums[0] += loss_sum(model, x, y, run.cfg.loss_chunks, pos)
        sums[1] += (y != IGNORE).sum() / parallel.context_parallel_size()  # each CP rank counts the whole rows
    model.train()
    dp_all_reduce(sums, context=True)
    return (sums[0] / sums[1]).item() if sums[1] > 0 else None


def _stamp(path: str) -> tuple:
    stat = os.stat(path)
    return path, stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=2)
def _eval_text(text_file: tuple, tokenizer_file: tuple):
    """(text, tokenizer), read once per (path, size, mtime) of each: a file edited between two
    runs in one process (a notebook) is read again, not served from the cache."""
    from llama.tokenizer import load_tokenizer

    return open(text_file[0], encoding="utf-8").read(), load_tokenizer(tokenizer_file[0])


def eval_text_perplexity(run: Run) -> float:
    """Perplexity of cfg.eval_data (llama.eval's strided windows: seq_len tokens, half overlap).
    Every rank runs it (model-parallel layers communicate); data-parallel ranks get the same number."""
    text, tokenizer = _eval_text(_stamp(run.cfg.eval_data), _stamp(str(run.data.tokenizer_path)))
    model = run.net.model
    model.eval()
    with run.autocast():
        res = perplexity(model, tokenizer, text, run.cfg.seq_len, max(1, run.cfg.seq_len // 2),
                         batch_size=run.cfg.micro_batch_size)
    model.train()
    return res.perplexity


def save(run: Run) -> Path:
    """A checkpoint of the run at its current step (collective: every rank calls it)."""
    step = run.progress.step
    state = {"step": step, "consumed": run.progress.consumed, "rng": rng_state(), "history": run.progress.history,
             "model_parallel_size": parallel.model_parallel_size(),
             "context_parallel_size": parallel.context_parallel_size(),
             "data_parallel_size": parallel.data_parallel_size(), "config": asdict(run.cfg),
             "data": str(run.data.dir), "tokenizer": str(run.data.tokenizer_path)}
    sharded = run.cfg.data_parallel == "fsdp"  # the optimizer goes to a DCP directory, sharded
    if not sharded:
        state["optimizer"] = run.optimizer.state_dict()
    if run.cfg.lora_rank:  # the adapters only, plus a pointer to the base (llama/train/adapters.py)
        path = save_adapter_checkpoint(run.cfg.out_dir, step, run.net.model, state, run.data.tokenizer_path,
                                       run.cfg.keep_last, base_pointer(run.cfg, run.net.model),
                                       run.optimizer if sharded else None)
    else:
        write_shards = functools.partial(fsdp.write_shards, optimizer=run.optimizer) if sharded else None
        path = save_checkpoint(run.cfg.out_dir, step, run.net.model, state, run.data.tokenizer_path,
                               run.cfg.keep_last, write_shards)
    run.progress.saved_any = True
    run.log.print(f"saved {path}")
    return path


def _record(run: Run, step: int, loss: float, norm: float, lr: float, window: dict) -> dict:
    """The logged numbers for `step`; window holds the tokens and training seconds since the last
    log (the step's .item() calls synchronise with the GPU, so the seconds are real)."""
    tokens_per_s = window["tokens"] / max(window["seconds"], 1e-9)
    world = dist.get_world_size() if dist.is_initialized() else 1
    tflops = flops_per_token(run.net.model.params, run.cfg.seq_len) * tokens_per_s / world / 1e12  # per device
    window.update(seconds=0.0, tokens=0)
    return {"step": step, "loss": loss, "lr": lr, "grad_norm": norm, "tokens_per_s": tokens_per_s, "tflops": tflops,
            "mfu": tflops / run.peak_tflops if run.peak_tflops else None, "memory_gb": memory_gb(run.device)}


def loop(run: Run) -> dict:
    """Steps run.progress.step .. max_steps; logs, evaluates and saves on schedule (the final
    checkpoint is the caller's: train.py saves it after the loop). Returns the curves."""
    cfg, progress = run.cfg, run.progress
    losses, val_losses = [], {}
    window = {"seconds": 0.0, "tokens": 0}
    for step in range(progress.step, cfg.max_steps):
        start = time.perf_counter()
        micro = run.data.batches.train_micro_batches(progress.consumed, cfg.batch_size, cfg.micro_batch_size,
                                                     parallel.data_parallel_rank(), parallel.data_parallel_size())
        loss, norm, lr = train_step(run, micro, step)
        window["seconds"] += time.perf_counter() - start
        window["tokens"] += sum(b[0].numel() for b in micro) * parallel.data_parallel_size()
        progress.step, progress.consumed = step + 1, progress.consumed + cfg.batch_size
        done = progress.step
        losses.append(loss)
        history = progress.history
        history["losses"].append(loss)
        run.log.advance()
        record = None
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            record = _record(run, done, loss, norm, lr, window)
        if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.max_steps):
            val = evaluate(run)
            if val is not None:
                val_losses[done] = history["val_losses"][done] = val
                record = dict(record or {"step": done}, val_loss=val)
                if not history["warned"] and (warning := overfitting_warning(history["val_losses"],
                                                                             history["losses"], 0, cfg.eval_every)):
                    record["warning"], history["warned"] = warning, True  # once a run
            if cfg.eval_data:
                record = dict(record or {"step": done}, eval_ppl=eval_text_perplexity(run))
        if record is not None:
            run.log.log({**record, **run.objective.pop_metrics()} if run.objective else record)
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.max_steps:
            save(run)
    return {"losses": losses, "val_losses": val_losses, "first_step": progress.first_step}
