"""LoRA (Hu et al., 2021): freeze the base, train two thin matrices beside each projection.

    y = W x + (alpha / r) * B (A dropout(x))        A: (r, in), B: (out, r), r << in, out

A starts Kaiming-uniform (as nn.Linear and PEFT do) and B at zero, so a fresh adapter is exactly
the base model. Only A and B get gradients and optimizer state: for Llama 3.1 8B at r = 8 on all
seven projections that is 21M numbers instead of 8.03B.

Under model parallelism the adapters follow their projection's split (the rule PEFT's tp_layer
uses), so every extra collective carries only r numbers per token:
- column-parallel W (wq, wk, wv, w1, w3; output rows split): A is replicated and B is split on
  its output rows like W. a = A x is the same on every rank; each rank's B gives its own slice of
  the output, so d(loss)/da is a partial sum per rank: it is all-reduced (r wide) in backward.
- row-parallel W (wo, w2; input columns split): A is split on its input columns like W, B is
  replicated. Each rank's A multiplies its slice of x; the r-wide partial products are
  all-reduced in forward, then B runs on every rank and the output is already complete.
The split of each tensor is in `parallel.SHARD_DIM` (`...wq.lora_A.weight` etc.), so weight
init, gradient norms and resharding read the one table like every other weight.

The adapters attach to the existing projection modules (`attention.wq.lora_A`,
`attention.wq.lora_B`: the state-dict keys PEFT uses, and the base keys stay Meta's), and a forward
hook adds the LoRA term to the projection's output; model.py is unchanged. Merging
(`merge_lora`) folds W += (alpha/r) B A into each rank's own shard, which is local: a column
rank's B rows times the full A, a row rank's full B times its A columns.

FSDP: the adapters are ordinary parameters of each block, attached before `fully_shard(block)`,
which shards them with the frozen base; FSDP2 keeps requires_grad per parameter and reduces only
the adapters' gradients (llama/train/adapters.py, docs/lora.md).
"""

import math
import zlib
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from llama import parallel
from llama.common.errors import UserError

# Meta's projection names and where they live in a TransformerBlock.
TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
MODULES = {"wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv", "wo": "attention.wo",
           "w1": "feed_forward.w1", "w2": "feed_forward.w2", "w3": "feed_forward.w3"}
LORA_DTYPES = ("auto", "float32", "bfloat16", "float16")


class LoRAError(UserError):
    """Bad LoRA input (rank, targets, an adapter that does not fit its base): the message says why."""


def is_lora_name(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


# ---------------------------------------------------------------------------- checks


def check_targets(targets: Iterable[str]) -> List[str]:
    targets = list(targets)
    if not targets:
        raise LoRAError(f"lora_targets is empty: list some of {', '.join(TARGETS)}")
    for t in targets:
        if t not in TARGETS:
            raise LoRAError(f"lora_targets: unknown projection {t!r}; valid: {', '.join(TARGETS)}")
    if len(set(targets)) != len(targets):
        raise LoRAError(f"lora_targets lists a projection twice: {targets}")
    return [t for t in TARGETS if t in targets]  # the canonical order


def check_settings(rank: int, alpha: float, dropout: float, targets) -> None:
    """What can be checked without the model: run with the other config checks."""
    if rank < 0:
        raise LoRAError(f"lora_rank={rank} must be >= 0 (0 turns LoRA off; 8 or 16 are usual)")
    if alpha <= 0:
        raise LoRAError(f"lora_alpha={alpha} must be positive (the usual choice is 2 x lora_rank)")
    if not 0.0 <= dropout < 1.0:
        raise LoRAError(f"lora_dropout={dropout} must be in [0, 1)")
    check_targets(targets)


def projection_shapes(args) -> Dict[str, tuple]:
    """(out_features, in_features) of each target projection, from ModelArgs."""
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    f, d = args.ffn_hidden_dim, args.dim
    return {"wq": (q, d), "wk": (kv, d), "wv": (kv, d), "wo": (d, q), "w1": (f, d), "w2": (d, f), "w3": (f, d)}


def check_model(args, rank: int, targets, mp: int = 1) -> None:
    """The rank against each layer's shape, and the model-parallel layout the adapters can take."""
    shapes = projection_shapes(args)
    for t in check_targets(targets):
        out, inp = shapes[t]
        if rank > min(out, inp):
            raise LoRAError(f"lora_rank={rank} is larger than {t} ({out} x {inp}): a rank above "
                            f"min(out, in) = {min(out, inp)} adds nothing; pick a smaller lora_rank")
    if mp > args.n_kv_heads and {"wk", "wv"} & set(targets):
        # Past n_kv_heads ranks each K/V head is duplicated across ranks; its lora_B copies would get
        # different gradients. Not supported: train wk/wv adapters at mp <= n_kv_heads.
        raise LoRAError(f"LoRA on wk/wv at model_parallel_size={mp} > n_kv_heads={args.n_kv_heads} is not "
                        f"supported: use model_parallel_size <= {args.n_kv_heads} or drop wk, wv from lora_targets")


# ---------------------------------------------------------------------------- layers


def _lora_hook(proj: nn.Module, inputs, out: torch.Tensor) -> torch.Tensor:
    """Forward hook on a projection: out + (alpha/r) B A dropout(x), collectives r wide."""
    x = proj.lora_dropout(inputs[0])
    a = F.linear(x, proj.lora_A.weight)  # (B, T, r): full (column) or this rank's partial sum (row)
    if parallel.model_parallel_size() > 1:
        if proj.lora_split == "column":  # identity forward; backward sums d/da over the ranks
            a = parallel.copy_to_model_parallel_region(a)
        else:  # sum the partial products of the ranks' input slices
            a = parallel.reduce_from_model_parallel_region(a)
    return out + proj.lora_scale * F.linear(a, proj.lora_B.weight)  # (B, T, out_local)


def _split(name: str) -> str:
    return "column" if parallel.shard_dim(name) == 0 else "row"


def lora_modules(model):
    """(Meta name of the projection, module) for every projection that carries an adapter."""
    for name, module in model.named_modules():
        if hasattr(module, "lora_A"):
            yield name, module


@torch.no_grad()
def add_lora(model, rank: int, alpha: float, dropout: float = 0.0, targets: Iterable[str] = TARGETS,
             seed: int = 0) -> None:
    """Attach fresh adapters (A Kaiming-uniform, B zero) to `targets` in every layer, in fp32 on the
    base's device. Like init_weights, each logical A is drawn whole from a generator seeded by its
    name and this rank keeps its shard: every model-parallel layout starts from the same adapter."""
    targets = check_targets(targets)
    check_model(model.params, rank, targets, parallel.model_parallel_size())
    for i, layer in enumerate(model.layers):
        for t in targets:
            proj = layer.get_submodule(MODULES[t])
            base = f"layers.{i}.{MODULES[t]}"
            out_local, in_local = proj.weight.shape
            device = proj.weight.device
            proj.lora_A = nn.Linear(in_local, rank, bias=False, device=device, dtype=torch.float32)
            proj.lora_B = nn.Linear(rank, out_local, bias=False, device=device, dtype=torch.float32)
            proj.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
            proj.lora_scale = alpha / rank
            proj.lora_split = _split(f"{base}.weight")
            name_a = f"{base}.lora_A.weight"
            gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name_a}".encode()))
            full = torch.empty(parallel.full_shape(name_a, proj.lora_A.weight.shape))
            nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=gen)  # fan_in: the full input width
            proj.lora_A.weight.copy_(parallel.shard(name_a, full))
            proj.lora_B.weight.zero_()
            proj.lora_hook = proj.register_forward_hook(_lora_hook)
    model.lora = {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": targets}


@torch.no_grad()
def merge_lora(model) -> None:
    """Fold every adapter into its base weight (W += (alpha/r) B A, on each rank's own shard) and
    remove it: the model is a plain Transformer again, decoding at no extra cost."""
    for _, proj in lora_modules(model):
        delta = proj.lora_scale * (proj.lora_B.weight.float() @ proj.lora_A.weight.float())
        proj.weight.copy_((proj.weight.float() + delta).to(proj.weight.dtype))
        proj.lora_hook.remove()
        for attr in ("lora_A", "lora_B", "lora_dropout"):
            delattr(proj, attr)
        for attr in ("lora_scale", "lora_split", "lora_hook"):
            delattr(proj, attr)
    model.__dict__.pop("lora", None)


# ---------------------------------------------------------------------------- training


def base_dtype_for(base_dtype: str, device: torch.device) -> torch.dtype:
    """The frozen base's dtype: auto = bf16 on CUDA (half the memory; the adapters stay fp32),
    fp32 on CPU."""
    if base_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, base_dtype)


def freeze_base(model, dtype: Optional[torch.dtype] = None) -> None:
    """No gradients for anything but the adapters; cast the frozen base to `dtype` (the adapters
    keep fp32: they are the master weights the optimizer updates)."""
    for name, p in model.named_parameters():
        if is_lora_name(name):
            p.requires_grad_(True)
            continue
        p.requires_grad_(False)
        if dtype is not None and p.dtype != dtype:
            p.data = p.data.to(dtype)


def trainable_parameters(model) -> Dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def check_only_adapters_train(model, optimizer) -> None:
    """Assert the contract: the optimizer holds exactly the adapters, the base needs no gradient."""
    adapters = {id(p) for n, p in model.named_parameters() if is_lora_name(n)}
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert adapters and in_optimizer == adapters, "the optimizer must hold exactly the LoRA parameters"
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and not is_lora_name(n)]
    assert not frozen, f"base parameters still require grad: {frozen[:3]}"


def adapter_state(model) -> Dict[str, torch.Tensor]:
    """This rank's adapter tensors under Meta-style keys ('layers.0.attention.wq.lora_A.weight')."""
    return {n: p.detach() for n, p in model.named_parameters() if is_lora_name(n)}


def count_lora_parameters(args, rank: int, targets=TARGETS, mp: int = 1) -> int:
    """r * (in + out) per adapted projection over all layers; with mp > 1, one model-parallel rank's
    share (replicated or split as SHARD_DIM says)."""
    shapes, total = projection_shapes(args), 0
    for t in check_targets(targets):
        out, inp = shapes[t]
        for part, n in (("lora_A", rank * inp), ("lora_B", out * rank)):
            total += n if parallel.shard_dim(f"layers.0.{MODULES[t]}.{part}.weight") is None else n // mp
    return args.n_layers * total
