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

Each adapted projection is replaced by a `LoRALinear` in its place in the module tree (visible in
`print(model)`): it holds the projection's own weight Parameter (so the base keys stay Meta's,
`layers.0.attention.wq.weight`), its `lora_A`, `lora_B` (PEFT's keys, `...wq.lora_A.weight`) and a
`lora_dropout`; model.py is unchanged. Merging (`merge_lora`) folds W += (alpha/r) B A into each
rank's own shard, which is local (a column rank's B rows times the full A, a row rank's full B
times its A columns), and puts the plain layer back. Quantizing refuses a model with unmerged
adapters (`refuse_adapters`); torch.compile traces LoRALinear like any layer.

Dropout (`LoRADropout`) draws each row's mask whole, from a generator seeded by the row's place in
the run's data, so model-parallel ranks, data-parallel ranks and micro-batches all see one
process's mask (`dropout_rows`, called by the training loop).

FSDP: the adapters are ordinary parameters of each block, attached before `fully_shard(block)`,
which shards them with the frozen base; FSDP2 keeps requires_grad per parameter and reduces only
the adapters' gradients (llama/train/adapters.py, docs/lora.md).
"""

import contextlib
import functools
import math
import zlib
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llama import parallel
from llama.common.dtypes import training_dtype
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
    if not math.isfinite(alpha) or alpha <= 0:
        raise LoRAError(f"lora_alpha={alpha} must be positive and finite (the usual choice is 2 x lora_rank)")
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
    if parallel.kv_heads_duplicated(args.n_kv_heads, mp) and {"wk", "wv"} & set(targets):
        # Past n_kv_heads ranks each K/V head is duplicated across ranks; its lora_B copies would get
        # different gradients. Not supported: train wk/wv adapters at mp <= n_kv_heads.
        raise LoRAError(f"LoRA on wk/wv at model_parallel_size={mp} > n_kv_heads={args.n_kv_heads} is not "
                        f"supported: use model_parallel_size <= {args.n_kv_heads} or drop wk, wv from lora_targets")


# ---------------------------------------------------------------------------- dropout


class LoRADropout(nn.Module):
    """Dropout on an adapter's input whose mask belongs to the data, not to the layout.

    Row b's mask is drawn whole, as a (length, full input width) uniform tensor from a generator
    seeded by the row's key and this projection's name; x[b, t, f] is kept where the draw is >= p
    and scaled by 1 / (1 - p), as nn.Dropout does. A row-parallel rank takes its slice of the
    features, a shorter (padded) micro-batch its first positions. The training loop gives each
    micro-batch its rows' keys (`dropout_rows`: their numbers among the run's training sequences,
    the seed) and the sequence length, so model-parallel ranks, data-parallel ranks, micro-batch
    splits and activation checkpointing's recomputation all draw what one process draws for those
    rows. Without keys (another training loop) each forward draws row keys from torch's generator,
    which activation checkpointing replays, mixed with the data-parallel rank."""

    def __init__(self, p: float, salt: int, in_features: int, feature_offset: int = 0):
        super().__init__()
        self.p, self.salt = p, salt  # salt: 32 bits naming the projection
        self.in_features, self.feature_offset = in_features, feature_offset  # full width; this rank's first
        self.rows: Optional[tuple] = None  # ([32-bit key per row], length, token index or None), set by dropout_rows

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        flat = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, F_local)
        return (flat * self._keep(flat) * (1.0 / (1.0 - self.p))).reshape(x.shape)

    @torch.compiler.disable  # torch.Generator objects: eager, between the compiled graphs
    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        B, T, F_local = x.shape
        if self.rows is None:  # another loop: fresh keys from torch's generator, per data-parallel rank
            salt = zlib.crc32(f"data-parallel rank {parallel.data_parallel_rank()}".encode())
            keys, length, index = [k ^ salt for k in torch.randint(0, 1 << 32, (B,)).tolist()], T, None
        else:
            keys, length, index = self.rows
        if len(keys) != B or (T > length if index is None else len(index) != T):
            raise ValueError(f"LoRA dropout keys for {len(keys)} rows of {length} positions; the input is {B} x {T}")
        masks = []
        for key in keys:
            # 32 bits of seed: the CPU's generator (mt19937) reads no more
            gen = torch.Generator(x.device).manual_seed(zlib.crc32(key.to_bytes(4, "little"), self.salt))
            draw = torch.rand(length, self.in_features, generator=gen, device=x.device)  # (L, F): one process's
            # context parallelism: this rank's tokens (past the draw: padding, untrained, any mask will do)
            rows = draw[:T] if index is None else draw[index.clamp(max=length - 1).to(x.device)]
            masks.append(rows[:, self.feature_offset:self.feature_offset + F_local] >= self.p)
        return torch.stack(masks)  # (B, T, F_local) bool


@contextlib.contextmanager
def dropout_rows(model, rows: Sequence[int], seed: int, length: int, index: Optional[torch.Tensor] = None):
    """Inside: LoRA dropout draws the masks of these rows of the run's data (rows[b]: the number of
    micro-batch row b among the run's training sequences, the same on every layout) under `seed`,
    each for `length` positions (the run's seq_len: a padded micro-batch uses the first ones; under
    context parallelism `index`, the global indices of this rank's tokens: llama/parallel/context.py).
    Wrap the forward and the backward: activation checkpointing recomputes the forward in backward."""
    modules = [m for m in model.modules() if isinstance(m, LoRADropout) and m.p > 0]
    keys = [zlib.crc32(f"{seed}:{g}".encode()) for g in rows]  # 32 bits per row
    for m in modules:
        m.rows = (keys, length, index)
    try:
        yield
    finally:
        for m in modules:
            m.rows = None


# ---------------------------------------------------------------------------- layers


def _split_of(layer: nn.Module, name: str) -> Optional[str]:
    """How `layer`'s product communicates: None (one process), "column" or "row"."""
    if isinstance(layer, parallel.ColumnParallelLinear):
        return "column"
    if isinstance(layer, parallel.RowParallelLinear):
        return "row"
    if type(layer) is nn.Linear and layer.bias is None:
        return None
    if isinstance(layer, LoRALinear):
        raise LoRAError(f"{name} already has an adapter: merge_lora first")
    raise LoRAError(f"{name} is a {type(layer).__name__}, not a float projection: LoRA attaches to an "
                    f"unquantized model")


class LoRALinear(nn.Module):
    """A frozen projection and its adapter, in the projection's place in the module tree:

        y = W x + scale * B A dropout(x)        scale = alpha / r

    `weight` is the projection's own parameter (this rank's shard of W), so the state-dict keys stay
    Meta's (`layers.0.attention.wq.weight`) beside PEFT's (`layers.0.attention.wq.lora_A.weight`).
    `split` is how the base layer's product communicates (module docstring): None, "column", "row".
    `merged()` gives the plain layer back with B A folded into W."""

    def __init__(self, base: nn.Module, name: str, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.split = _split_of(base, name)
        self.weight = base.weight  # the same Parameter: frozen or not, in the base's dtype
        out_local, in_local = base.weight.shape
        linear = functools.partial(nn.Linear, bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_A = linear(in_local, rank)  # (r, in_local): full (column) or this rank's columns (row)
        self.lora_B = linear(rank, out_local)  # (out_local, r): this rank's rows (column) or full (row)
        mp, mp_rank = parallel.model_parallel_size(), parallel.model_parallel_rank()
        in_full, offset = (in_local * mp, in_local * mp_rank) if self.split == "row" else (in_local, 0)
        self.lora_dropout = LoRADropout(dropout, zlib.crc32(name.encode()), in_full, offset)
        self.scale = alpha / rank
        self.enabled = True  # False inside `disabled(model)`: the base projection alone

    def extra_repr(self) -> str:
        kind = f"{self.split}-parallel, " if self.split else ""
        return f"{kind}weight {tuple(self.weight.shape)}, r={self.lora_A.out_features}, scale={self.scale:g}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split == "column":  # as ColumnParallelLinear
            y = F.linear(parallel.copy_to_model_parallel_region(x), self.weight)
        elif self.split == "row":  # as RowParallelLinear
            y = parallel.all_reduce(F.linear(x, self.weight))
        else:
            y = F.linear(x, self.weight)
        if not self.enabled:
            return y
        x_a = self.lora_dropout(x)
        if not torch.is_autocast_enabled(x.device.type):  # a bf16 base, fp32 adapters (autocast casts itself)
            x_a = x_a.to(self.lora_A.weight.dtype)
        a = self.lora_A(x_a)  # (B, T, r): complete (column), this rank's partial sum (row)
        if self.split == "column":  # a is complete; d(loss)/da sums over ranks
            a = parallel.copy_to_model_parallel_region(a)  # identity forward, r-wide all-reduce backward
        elif self.split == "row":  # the ranks' partial A x are summed, r wide
            a = parallel.all_reduce(a)
        return y + (self.scale * self.lora_B(a)).to(y.dtype)  # (B, T, out_local)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The plain layer this one wraps, with W += scale B A folded into this rank's shard (local:
        a column rank's B rows times the full A, a row rank's full B times its A columns)."""
        delta = self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())
        self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
        (out_local, in_local), mp = self.weight.shape, parallel.model_parallel_size()
        with torch.device("meta"):  # the factories' own weights: never allocated, replaced below
            if self.split == "row":
                layer = parallel.row_parallel_linear(in_local * mp, out_local)
            else:
                layer = parallel.column_parallel_linear(in_local, out_local * (mp if self.split else 1))
        layer.weight = self.weight
        return layer


def lora_modules(model):
    """(name, LoRALinear) for every projection that carries an adapter."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


@torch.no_grad()
def add_lora(model, rank: int, alpha: float, dropout: float = 0.0, targets: Iterable[str] = TARGETS,
             seed: int = 0) -> None:
    """Replace `targets` in every layer by LoRALinear with fresh adapters (A Kaiming-uniform, B zero)
    in fp32 on the base's device. Like init_weights, each logical A is drawn whole from a generator
    seeded by its name and this rank keeps its shard: every model-parallel layout starts alike."""
    targets = check_targets(targets)
    check_model(model.params, rank, targets, parallel.model_parallel_size())
    for i, layer in enumerate(model.layers):
        for t in targets:
            name = f"layers.{i}.{MODULES[t]}"
            parent, _, attr = MODULES[t].rpartition(".")
            wrapped = LoRALinear(layer.get_submodule(MODULES[t]), name, rank, alpha, dropout)
            name_a = f"{name}.lora_A.weight"
            gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name_a}".encode()))
            full = torch.empty(parallel.full_shape(name_a, wrapped.lora_A.weight.shape))
            nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=gen)  # fan_in: the full input width
            wrapped.lora_A.weight.copy_(parallel.shard(name_a, full))
            wrapped.lora_B.weight.zero_()
            setattr(layer.get_submodule(parent), attr, wrapped)
    model.lora = {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": targets}


@contextlib.contextmanager
def disabled(model):
    """The base model, every adapter left out (PEFT's disable_adapter): DPO's reference is the base
    itself with the adapters off, no second copy of the weights (llama/train/dpo.py)."""
    modules = [module for _, module in lora_modules(model)]
    for module in modules:
        module.enabled = False
    try:
        yield model
    finally:
        for module in modules:
            module.enabled = True


def merge_lora(model) -> None:
    """Fold every adapter into its base weight and put the plain layer back in its place: the
    model is a plain Transformer again (Meta's keys only), decoding at no extra cost."""
    for name, module in list(lora_modules(model)):
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, module.merged())
    model.__dict__.pop("lora", None)


def refuse_adapters(model, what: str) -> None:
    """`what` (quantizing, ...) would drop or mangle unmerged adapters: refuse in one line."""
    names = [name for name, _ in lora_modules(model)]
    if names:
        raise LoRAError(f"{what}: the model carries unmerged LoRA adapters ({names[0]} and {len(names) - 1} more): "
                        f"merge them first (llama.lora.merge_lora(model), or Llama.build(..., lora=ADAPTER))")


# ---------------------------------------------------------------------------- training


def base_dtype_for(base_dtype: str, device: torch.device) -> torch.dtype:
    """The frozen base's dtype: auto = bf16 on CUDA (half the memory; the adapters stay fp32),
    fp32 on CPU."""
    return training_dtype(base_dtype, device)


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
