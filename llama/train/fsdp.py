"""Sharded data parallelism: PyTorch's FSDP2 (`fully_shard`) over the data-parallel group,
composed with the Fairscale tensor parallelism of llama/parallel/__init__.py.

With `data_parallel = "ddp"` every data-parallel rank keeps all of its model-parallel shard's fp32
weights, gradients and both AdamW moments: 16 bytes per parameter, however many GPUs there are.
With `data_parallel = "fsdp"` (ZeRO-3; Rajbhandari et al., 2020) each of the D data-parallel ranks
keeps 1/D of each of them and all-gathers a block's weights just before the block runs:

    model parallel (M ranks, Fairscale)  splits a weight by heads / FFN units / vocabulary;
    FSDP2 (D ranks)                       splits each rank's piece again along dim 0, as a DTensor
                                          on a 1-D mesh built from Fairscale's data-parallel group
                                          (times the context-parallel ranks, which hold the same
                                          weights: parallel.dp_cp_group).

FSDP knows nothing of the model-parallel split: it sees a (n/M, k) weight and shards it. So the
global gradient norm sums the squares of the local pieces over the data-parallel group (every
parameter) and then over the model-parallel group (the split ones only: SHARD_DIM).
`reshard_after_forward = false` keeps the gathered weights from forward to backward (ZeRO-2: one
all-gather per step instead of two, more memory).

Checkpoints stay Meta's layout: each parameter is all-gathered (`full_tensor()`) one at a time and
written by one data-parallel rank per model-parallel rank as consolidated.NN.pth. The AdamW state
goes through torch.distributed.checkpoint (DCP) per model-parallel rank over the data-parallel
group, so a run resumes at any data-parallel size (DCP reshards on load).
"""

import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor

try:  # public since torch 2.6; without it, ddp still works and fsdp is a one-line error
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
except ImportError:
    FSDPModule = MixedPrecisionPolicy = fully_shard = None

from llama import parallel
from llama.checkpoint.meta import load_torch_file
from llama.common.errors import UserError
from llama.common.files import atomic_write


class FSDPError(UserError):
    """A data_parallel = "fsdp" run that cannot work as configured: the message says the fix."""


def require_fully_shard() -> None:
    if fully_shard is None:
        raise FSDPError(f"data_parallel=\"fsdp\" needs torch.distributed.fsdp.fully_shard (torch >= 2.6; this is "
                        f"torch {torch.__version__}): upgrade torch or use data_parallel=\"ddp\"")


def is_sharded(model: torch.nn.Module) -> bool:
    return FSDPModule is not None and isinstance(model, FSDPModule)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a (possibly FSDP-sharded) tensor, sharing its storage."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_model(model, device: torch.device, reshard_after_forward: bool = True, compute_dtype=torch.float32):
    """fully_shard each block, the embedding, [final norm, output] and the root, over the
    data-parallel group. compute_dtype (bf16 on CUDA) is the dtype FSDP all-gathers the weights in;
    the sharded master weights, the optimizer states and the gradient reduction stay fp32.
    One process (no group to shard over): the model as it is, on `device`."""
    if not dist.is_initialized():
        return model.to(device)
    mesh = DeviceMesh.from_group(parallel.dp_cp_group(), device.type)  # context-parallel ranks: the same weights
    low = compute_dtype != torch.float32
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype if low else None, reduce_dtype=torch.float32 if low else None)
    kwargs = dict(mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    for block in model.layers:  # one all-gather per block: only one block's full weights at a time
        fully_shard(block, **kwargs)
    if not model.params.tie_word_embeddings:  # a tied table is one parameter: it stays with the root
        fully_shard(model.tok_embeddings, **kwargs)
        fully_shard([model.norm, model.output], **kwargs)
    fully_shard(model, **kwargs)
    return model


def state_bytes(model, optimizer) -> dict:
    """This rank's bytes of parameters, gradients and optimizer states (tensor sizes, not RSS)."""
    def size(t):
        t = local(t)
        return t.numel() * t.element_size()

    params = list(model.parameters())
    return {"params": sum(size(p) for p in params),
            "grads": sum(size(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(size(v) for s in optimizer.state.values() for v in s.values()
                             if isinstance(v, torch.Tensor))}


# ---------------------------------------------------------------------------- checkpoints


@torch.no_grad()
def gathered_state_dict(model, keep: bool, select=None, device="cpu") -> dict:
    """This model-parallel rank's state dict (Meta's keys and shard layout), all-gathered over the
    data-parallel group one tensor at a time and moved to `device`; ranks with keep=False take
    part in the gathers and get {}. select(name) picks the tensors (LoRA: the adapters only).
    (get_model_state_dict(full_state_dict=True) would keep the result on global rank 0 only,
    losing the other model-parallel ranks' shards.)"""
    state, seen = {}, {}
    for name, t in model.state_dict().items():
        if select is not None and not select(name):
            continue
        if id(t) in seen:  # a tied weight: one tensor under two names, gathered once
            state[name] = state.get(seen[id(t)])
            continue
        seen[id(t)] = name
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if keep:
            state[name] = full.detach().to(device, copy=True)
        del full
    return state if keep else {}


def write_shards(tmp: Path, model, train_state: dict, optimizer) -> None:
    """Collective: consolidated.NN.pth + train_state.NN.pth (by one writer per model-parallel
    rank) and optimizer.NN/ (a DCP directory, every data-parallel rank writes its piece)."""
    mp_rank, writer = parallel.model_parallel_rank(), parallel.is_checkpoint_writer()
    weights = gathered_state_dict(model, keep=writer)
    if writer:
        atomic_write(tmp / f"consolidated.{mp_rank:02d}.pth", lambda f: torch.save(weights, f))
        atomic_write(tmp / f"train_state.{mp_rank:02d}.pth", lambda f: torch.save(train_state, f))
    weights.clear()  # the gathered copy goes before DCP writes the optimizer
    save_optimizer(tmp, model, optimizer)


def save_optimizer(tmp: Path, model, optimizer) -> None:
    """Collective over the data-parallel group: every rank writes its piece of the AdamW state to
    optimizer.NN/ (a DCP directory per model-parallel rank; LoRA: the adapters' state only)."""
    with _dcp_call():
        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)},
                 checkpoint_id=tmp / f"optimizer.{parallel.model_parallel_rank():02d}",
                 process_group=parallel.dp_cp_group(), no_dist=not dist.is_initialized())


def load_optimizer(path: Path, model, optimizer) -> None:
    """The AdamW state from optimizer.NN/, resharded by DCP to this run's data-parallel size."""
    optim_state = get_optimizer_state_dict(model, optimizer)  # the template DCP fills in (sharded here)
    with _dcp_call():
        dcp.load({"optimizer": optim_state}, checkpoint_id=path / f"optimizer.{parallel.model_parallel_rank():02d}",
                 process_group=parallel.dp_cp_group(), no_dist=not dist.is_initialized())
    set_optimizer_state_dict(model, optimizer, optim_state)


@contextmanager
def _dcp_call():
    """Around a DCP save or load. DCP wraps a rank's failure in CheckpointException, a BaseException
    that `except Exception` misses (a full disk then escaped every handler): the first failing
    rank's own error is raised instead, its OSError where a write failed. Also quiets DCP's warning that
    it assumes one process when there is no process group: here that is the intent (a one-process
    run, or resuming on one process)."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            yield
    except CheckpointException as e:
        failures = e.failures or {}
        first = failures[min(failures)][0] if failures else None
        cause = first
        while cause is not None and not isinstance(cause, OSError):  # torch.save hides a failed write
            cause = cause.__cause__ or cause.__context__             # under its zip writer's RuntimeError
        if isinstance(cause or first, Exception):
            raise (cause or first) from e
        raise RuntimeError(str(e)) from e


def is_fsdp_checkpoint(path: Path) -> bool:
    return (Path(path) / "optimizer.00").is_dir()


def load_full_weights(model, weights: dict) -> None:
    """Copy a model-parallel shard's full tensors (a consolidated.NN.pth) into the model, each
    data-parallel rank keeping only its FSDP piece (cut locally: no communication)."""
    missing = [n for n in model.state_dict() if n not in weights]
    extra = [n for n in weights if n not in model.state_dict()]
    if missing or extra:
        raise FSDPError(f"checkpoint tensors do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    copy_full_tensors(model, weights)


@torch.no_grad()
def copy_full_tensors(model, tensors: dict) -> None:
    """Copy the named parameters' full tensors (this model-parallel rank's) into the model, sharded
    or not: each data-parallel rank keeps only its FSDP piece. Parameters not named are left alone."""
    for name, p in model.named_parameters():  # a tied weight is listed once
        if name not in tensors:
            continue
        full = tensors[name].to(device=p.device, dtype=p.dtype)
        if isinstance(p, DTensor):
            full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
        local(p).copy_(full)


def load_checkpoint(path: Path, model, optimizer, device) -> dict:
    """Resume from an FSDP checkpoint at any data-parallel size (same model-parallel size):
    the weights from consolidated.NN.pth, the optimizer from optimizer.NN/ (DCP reshards it).
    Returns the training state (step, data position, RNG ...)."""
    mp_rank, mp = parallel.model_parallel_rank(), parallel.model_parallel_size()
    state_file = path / f"train_state.{mp_rank:02d}.pth"
    if not is_fsdp_checkpoint(path):
        raise FSDPError(f"{path} was saved by a data_parallel=\"ddp\" run: resume it with ddp (or start a new "
                        f"fsdp run with init_from={path})")
    saved_mp = len(list(path.glob("consolidated.*.pth")))
    if saved_mp != mp or not state_file.is_file():
        raise FSDPError(f"{path} was saved at model_parallel_size={saved_mp}, this run has {mp}: resume at "
                        f"{saved_mp}, or convert it first (python -m llama.convert {path} NEW_DIR --to meta "
                        f"--shards {mp}) and start a new run with init_from=NEW_DIR (the optimizer state stays behind)")
    train_state = load_torch_file(state_file)  # checksummed, as generate.py's loads are
    weights = load_torch_file(path / f"consolidated.{mp_rank:02d}.pth")
    load_full_weights(model, weights)
    del weights
    load_optimizer(path, model, optimizer)
    return train_state
