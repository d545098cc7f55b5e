"""Model parallelism: the only file that imports fairscale.

Megatron-style tensor parallelism in three layers (Shoeybi et al., 2019):

- ColumnParallelLinear splits the *output* features: rank r holds rows r*n/M .. (r+1)*n/M of the
  weight and computes its slice of the output with no communication.
- RowParallelLinear splits the *input* features: each rank multiplies its slice of the input and
  the partial results are summed with one all-reduce.
- VocabParallelEmbedding splits the vocabulary: each rank looks up the ids it owns, writes zeros
  for the others, and an all-reduce fills in the rest.

A column layer followed by a row layer (wq/wk/wv -> wo, w1/w3 -> w2) needs one all-reduce per pair
in the forward pass (two per block); in backward each column layer all-reduces its input's gradient
(five per block) and the row layers none (docs/figures/tensor_parallel.png). Fairscale's mapping functions are the autograd-aware collectives; we use them
directly so that the layers allocate only their shard (and nothing at all on the `meta` device).
Compiled inference uses torch's functional collectives instead, which Dynamo traces (all_reduce).
With no model-parallel group (a plain single process) the factories return ordinary torch modules.

`SHARD_DIM` (llama/parallel/layout.py, with the K/V-head rule) is the one table of which dimension
each checkpoint tensor is split along; the model, the weight initialisation and checkpoint
resharding all read it.
"""

import atexit
import contextlib
import io
import os
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from llama.parallel.layout import (  # noqa: F401 (the layout's names are parallel.*)
    SHARD_DIM,
    ParallelError,
    check_divisible,
    check_model_parallel,
    kv_heads_duplicated,
    kv_heads_for,
    local_kv_heads,
    repeat_kv_heads,
    shard_dim,
)

import fairscale.nn.model_parallel.initialize as fs_init
from fairscale.nn.model_parallel.mappings import (
    copy_to_model_parallel_region,
    gather_from_model_parallel_region,
    reduce_from_model_parallel_region,
)

# ---------------------------------------------------------------------------- process groups


def model_parallel_is_initialized() -> bool:
    return fs_init.model_parallel_is_initialized()


def model_parallel_size() -> int:
    return fs_init.get_model_parallel_world_size() if model_parallel_is_initialized() else 1


def model_parallel_rank() -> int:
    return fs_init.get_model_parallel_rank() if model_parallel_is_initialized() else 0


def data_parallel_size() -> int:
    return fs_init.get_data_parallel_world_size() if model_parallel_is_initialized() else 1


def data_parallel_rank() -> int:
    return fs_init.get_data_parallel_rank() if model_parallel_is_initialized() else 0


def model_parallel_group():
    return fs_init.get_model_parallel_group() if model_parallel_is_initialized() else None


def data_parallel_group():
    return fs_init.get_data_parallel_group() if model_parallel_is_initialized() else None


def is_first_rank() -> bool:
    """Global rank 0, or the only process: the one that prints, logs, prepares data and writes what
    is written once (a report, params.json, `latest`)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def is_checkpoint_writer() -> bool:
    """Whether this process writes its model-parallel rank's checkpoint files: data-parallel rank
    r mod D for model-parallel rank r (context-parallel rank 0 of those, which hold the same weights),
    so that with several nodes the writers (and the host memory a full shard takes) spread over the
    nodes. One process: itself."""
    return data_parallel_rank() == model_parallel_rank() % data_parallel_size() and context_parallel_rank() == 0


# Context parallelism (llama/parallel/context.py): the ranks that share each sequence. Fairscale lays ranks
# out as (data, pipeline, model) with the model dimension fastest; this project has no pipeline stages,
# so Fairscale's pipeline dimension is the context-parallel one: the paper's order [TP, CP, PP, DP].
def context_parallel_size() -> int:
    return dist.get_world_size(context_parallel_group()) if model_parallel_is_initialized() else 1


def context_parallel_rank() -> int:
    return dist.get_rank(context_parallel_group()) if model_parallel_is_initialized() else 0


def context_parallel_group():
    return fs_init.get_pipeline_parallel_group() if model_parallel_is_initialized() else None


_DP_CP = {}  # Fairscale's context-parallel group -> the data x context group made with it


def dp_cp_group():
    """The ranks that hold the same model-parallel shard of the weights: data x context parallel. DDP
    averages gradients and FSDP shards over them (CP ranks see other tokens of the same batch)."""
    return data_parallel_group() if context_parallel_size() == 1 else _DP_CP[context_parallel_group()]


def dp_cp_size() -> int:
    return data_parallel_size() * context_parallel_size()


def dp_cp_rank() -> int:
    return dist.get_rank(dp_cp_group()) if model_parallel_is_initialized() else 0


def init_distributed(model_parallel_size: Optional[int] = None, backend: Optional[str] = None,
                     context_parallel_size: int = 1) -> int:
    """Join the torchrun job (if any) and split it into model-parallel x context-parallel x data-parallel
    groups (model ranks adjacent, then context, then data).

    Reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR. NCCL on CUDA, gloo on CPU. In a plain
    `python` process (no WORLD_SIZE) with model_parallel_size in (None, 1) nothing is set up and the
    layers fall back to plain torch modules. Returns the model-parallel size in use.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cp = context_parallel_size
    mp = model_parallel_size or max(1, world_size // cp)
    if world_size == 1 and not dist.is_initialized():
        if mp * cp != 1:
            raise ParallelError(f"model_parallel_size={mp} x context_parallel_size={cp} needs {mp * cp} processes: "
                                f"launch with `torchrun --nproc_per_node {mp * cp} ...`")
        return 1
    if world_size % (mp * cp) != 0:
        raise ParallelError(f"model_parallel_size={mp} x context_parallel_size={cp} does not divide the world size "
                            f"{world_size}: pick sizes whose product divides the number of processes")
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        atexit.register(_leave_process_group)
    if not model_parallel_is_initialized():
        with contextlib.redirect_stdout(io.StringIO()):  # fairscale prints its group sizes on every rank
            fs_init.initialize_model_parallel(mp, pipeline_length=cp)
        if cp > 1:  # every rank makes every group, in one order; it keeps its own
            grid = torch.arange(world_size).view(-1, cp, mp)  # (data, context, model): Fairscale's layout
            for k in range(mp):
                group = dist.new_group(grid[:, :, k].flatten().tolist())
                if dist.get_rank() % mp == k:
                    _DP_CP[context_parallel_group()] = group
    elif (fs_init.get_model_parallel_world_size(), dist.get_world_size(context_parallel_group())) != (mp, cp):
        raise ParallelError(f"model parallel is already initialised with size {fs_init.get_model_parallel_world_size()} "
                            f"(context parallel {dist.get_world_size(context_parallel_group())}), not {mp} ({cp})")
    return mp


def _leave_process_group() -> None:
    # A script that simply returns leaves the process group to interpreter teardown, where gloo's
    # threads can be torn down mid-flight ("terminate called without an active exception", SIGABRT,
    # 2 runs in 80 of notebook 04's worker here). Destroying it explicitly at exit joins them first.
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- layers


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W split by rows (output features): this rank computes y[..., its slice]."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        mp = model_parallel_size()
        check_divisible("output features", out_features, mp)
        self.weight = nn.Parameter(torch.empty(out_features // mp, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # identity forward, all-reduce of the input's gradient backward
        return F.linear(copy_to_model_parallel_region(x), self.weight)


class RowParallelLinear(nn.Module):
    """y = x W^T with W split by columns (input features): partial products summed across ranks."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        mp = model_parallel_size()
        check_divisible("input features", in_features, mp)
        self.weight = nn.Parameter(torch.empty(out_features, in_features // mp))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x is already this rank's slice of the features (the column layer before produced it)
        return all_reduce(F.linear(x, self.weight))


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; ids owned by other ranks contribute zeros here."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        mp, rank = model_parallel_size(), model_parallel_rank()
        check_divisible("vocab_size", vocab_size, mp)
        per_rank = vocab_size // mp
        self.vocab_start, self.vocab_end = rank * per_rank, (rank + 1) * per_rank
        self.weight = nn.Parameter(torch.empty(per_rank, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)
        local_ids = (tokens - self.vocab_start).masked_fill(outside, 0)
        h = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return all_reduce(h)


PARALLEL_LINEARS = (ColumnParallelLinear, RowParallelLinear)


def _traced_inference() -> bool:
    """Being compiled with no autograd: the collectives below can be functional ones."""
    return torch.compiler.is_compiling() and not torch.is_grad_enabled()


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum x over the model-parallel ranks (the gradient passes through unchanged).

    Under torch.compile without autograd (compiled decoding) this is a functional collective,
    which Dynamo traces into the graph; fairscale's (an in-place all-reduce in an autograd.Function
    that marks its input dirty) makes Dynamo break the graph at every call: ~2 breaks per layer,
    each resumed in a frame of its own."""
    if _traced_inference():
        return funcol.all_reduce(x, "sum", model_parallel_group())
    return reduce_from_model_parallel_region(x)


def gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's x along the last dimension (rank order); traceable like all_reduce.
    The model's logits: every rank's vocabulary slice."""
    if model_parallel_size() == 1:
        return x
    if _traced_inference():
        return funcol.all_gather_tensor(x.contiguous(), x.dim() - 1, model_parallel_group())
    return gather_from_model_parallel_region(x)


class LocalProduct(nn.Module):
    """A column- or row-parallel layer whose local product x W_shard^T is another module (a quantized
    linear: llama/generation/quantize.py), with the same communication around it. Inference only."""

    def __init__(self, layer: nn.Module, local: nn.Module):
        super().__init__()
        self.row = isinstance(layer, RowParallelLinear)
        self.local = local

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row:  # x is this rank's slice of the features: partial products summed
            return all_reduce(self.local(x))
        return self.local(x)


def with_local_product(layer: nn.Module, local: nn.Module) -> nn.Module:
    """`local` in place of `layer`: itself for a plain nn.Linear, wrapped in LocalProduct for a parallel one."""
    return LocalProduct(layer, local) if isinstance(layer, PARALLEL_LINEARS) else local


def column_parallel_linear(in_features: int, out_features: int) -> nn.Module:
    if model_parallel_size() == 1:
        return nn.Linear(in_features, out_features, bias=False)
    return ColumnParallelLinear(in_features, out_features)


def row_parallel_linear(in_features: int, out_features: int) -> nn.Module:
    if model_parallel_size() == 1:
        return nn.Linear(in_features, out_features, bias=False)
    return RowParallelLinear(in_features, out_features)


def vocab_parallel_embedding(vocab_size: int, dim: int) -> nn.Module:
    if model_parallel_size() == 1:
        return nn.Embedding(vocab_size, dim)
    return VocabParallelEmbedding(vocab_size, dim)


# ---------------------------------------------------------------------------- shards


_KV = ("attention.wk.weight", "attention.wv.weight", "attention.wk.lora_B.weight", "attention.wv.lora_B.weight")


def shard(name: str, full: torch.Tensor, rank: Optional[int] = None, size: Optional[int] = None,
          n_kv_heads: Optional[int] = None) -> torch.Tensor:
    """This rank's piece of the full (logical) tensor `name`. Given n_kv_heads, wk/wv (and their
    LoRA B) `full` holds each K/V head once, and the rank gets its heads by the K/V-head rule
    (local_kv_heads)."""
    rank = model_parallel_rank() if rank is None else rank
    size = model_parallel_size() if size is None else size
    dim = shard_dim(name)
    if dim is None or size == 1:
        return full
    if n_kv_heads is not None and name.endswith(_KV):
        heads = full.view(n_kv_heads, -1, full.shape[-1])  # (K, Dh, D or r)
        return heads[local_kv_heads(n_kv_heads, size, rank)].reshape(-1, full.shape[-1])
    check_divisible(f"{name} dim {dim}", full.shape[dim], size)
    return full.chunk(size, dim=dim)[rank]


def full_shape(name: str, local_shape: torch.Size, size: Optional[int] = None,
               n_kv_heads: Optional[int] = None) -> torch.Size:
    """The logical shape of a parameter whose local shard has `local_shape`. Given n_kv_heads, the
    shape of wk/wv with each K/V head once (before kv_heads_for duplicated them over the ranks)."""
    size = model_parallel_size() if size is None else size
    dim = shard_dim(name)
    if dim is None:
        return torch.Size(local_shape)
    shape = list(local_shape)
    shape[dim] *= size
    if n_kv_heads is not None and name.endswith(_KV):
        shape[dim] = shape[dim] * n_kv_heads // kv_heads_for(n_kv_heads, size)
    return torch.Size(shape)


def gather(name: str, local: torch.Tensor) -> torch.Tensor:
    """Reassemble the full tensor from every model-parallel rank's shard (a collective)."""
    dim = shard_dim(name)
    if dim is None or model_parallel_size() == 1:
        return local
    pieces = [torch.empty_like(local) for _ in range(model_parallel_size())]
    dist.all_gather(pieces, local.contiguous(), group=model_parallel_group())
    return torch.cat(pieces, dim=dim)
