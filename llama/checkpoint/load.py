"""Load official weights (Meta, HF, GGUF) into the Transformer at any model-parallel size; save them.

    load_model(path)   detect the format -> ModelArgs -> build on the `meta` device (no memory)
                       -> this rank's slice of every tensor, read from memory-mapped files
                       -> load_state_dict(assign=True) -> model.to(device)

Memory: a tensor that needs no change (right dtype, one source shard) is a view into the mapped
file, so loading costs about the weights once. A tensor that must be copied (merged from several
shards, permuted, cast, dequantized) is built, then the pages it was read from are dropped from
this process (madvise), so the file and its copy are never both resident.

Quantized targets (`quantize="int8"/"int4"`): each linear weight goes straight from the file into its
quantized layer, a few rows at a time (generation/quantize.py quantize_rows), so the float model never
exists; GGUF Q8_0/Q4_0 blocks are kept as they are (a view of the file: nothing is copied or
requantized) where the scheme asks for groups of 32. Peak memory: the quantized weights plus one
slice of float rows (docs/quantization.md measures it at the 8B shape).

Resharding N -> M: each source tensor is split along the dimension `parallel.SHARD_DIM` names; this
rank's piece of the logical tensor is cut from whichever source shards overlap it. K/V heads are
handled per head: Meta's 405B MP16 release (and our own checkpoints at mp > n_kv_heads) store each
K/V head once per rank that uses it; we read the first copy and duplicate again as the target needs.
"""

import ctypes
import functools
import os
import sys
from pathlib import Path
from typing import List, Optional

import torch
from torch.overrides import TorchFunctionMode

from llama import parallel
from llama.common import assets
from llama.common.checks import check_context_fits, check_sizes
from llama.common.dtypes import parse_dtype
from llama.model import ModelArgs, Transformer
from llama.tokenizer.errors import TokenizerError
from llama.tokenizer.paths import tokenizer_file
from llama.checkpoint.common import CheckpointError
from llama.checkpoint.gguf import Blocks, GGUFFormatError, GGUFSource
from llama.checkpoint.hf import HFSource
from llama.checkpoint.meta import MetaSource
from llama.generation import quantize as quantization


_IGNORED_KEYS = {"rope.freqs", "rope_freqs.weight"}  # Llama 2's stored RoPE table; llama.cpp's 3.1 factors


# ---------------------------------------------------------------------------- detection


def resolve(path) -> Path:
    """A model name (`smollm2`: llama/common/assets.py) stands for its file, and a training run's out_dir
    for its newest complete checkpoint: train.py writes a `latest` file naming it (llama/train/state.py),
    so `--ckpt-dir out/default` just works."""
    path = Path(assets.model_path(path))
    pointer = path / "latest"
    if path.is_dir() and pointer.is_file() and not (path / "params.json").exists():
        target = path / pointer.read_text().strip()
        if not (target / "params.json").is_file():
            raise CheckpointError(f"{pointer} names {target.name}, which is missing or incomplete: "
                                  f"pass a step_NNNNNN directory of {path} instead")
        return target
    return path


def detect_format(path) -> str:
    """'meta' (params.json + consolidated.*.pth), 'hf' (config.json + *.safetensors) or 'gguf'."""
    path = resolve(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory: pass a Meta/HF checkpoint dir or a .gguf file")
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise CheckpointError(f"{path}: not a GGUF file; for Meta or HF weights pass the directory")
    if (path / "params.json").exists() or list(path.glob("consolidated.*.pth")):
        return "meta"
    if (path / "config.json").exists() or list(path.glob("*.safetensors")):
        return "hf"
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf"
    raise CheckpointError(
        f"{path}: no weights found (expected params.json + consolidated.NN.pth, config.json + "
        f"*.safetensors, or one .gguf file)"
    )


def _open(path):
    """The format's reader: an object with args(**overrides), n_shards, mmapped, pieces(key), split_dim(...)."""
    path = resolve(path)
    fmt = detect_format(path)
    if fmt == "meta":

        return MetaSource(path)
    if fmt == "hf":

        return HFSource(path)

    file = path if path.is_file() else sorted(path.glob("*.gguf"))[0]
    try:
        return GGUFSource(file)
    except GGUFFormatError as e:
        raise CheckpointError(f"{file}: {e}") from None


def read_model_args(path, **overrides) -> ModelArgs:
    """ModelArgs from params.json / config.json / GGUF metadata, with `overrides` applied."""
    return _open(path).args(**overrides)


def default_tokenizer_path(path) -> Optional[Path]:
    """Where this checkpoint's tokenizer lives: tokenizer.model or tokenizer.json beside the weights
    (Meta's downloads: tokenizer.model one dir up), GGUF -> the .gguf file itself; None if none.
    The lookup is llama.tokenizer.tokenizer_file's, shared with train.py and data prepare."""
    path = resolve(path)
    fmt = detect_format(path)
    if fmt == "gguf":
        return path if path.is_file() else sorted(path.glob("*.gguf"))[0]
    try:
        return tokenizer_file(path, flag="--tokenizer-path (generate.py) or tokenizer_path (Llama.build)")
    except TokenizerError:
        if any(p.is_symlink() for p in (path / "tokenizer.model", path / "tokenizer.json")):
            raise  # a dangling link: say so, rather than "no tokenizer"
        return None


# ---------------------------------------------------------------------------- loading


def load_model(path, max_seq_len: int = 2048, max_batch_size: int = 1, device=None, dtype=None,
               quantize: Optional[str] = None, group_size: Optional[int] = None) -> Transformer:
    """The Transformer with this rank's shard of the weights at `path` (Meta dir, HF dir or .gguf).

    dtype None keeps the checkpoint's dtype (GGUF: float32 for quantized files). `quantize` ("int8",
    "int4") with `group_size` (None: the scheme's default, or a GGUF file's own Q8_0/Q4_0 blocks):
    every linear layer is loaded straight into its quantized form (generation/quantize.py), the rest
    in `dtype`. The model stays in train mode, on the CPU unless `device` is given.
    """
    check_sizes(max_seq_len, max_batch_size)
    dtype = parse_dtype(dtype)
    if quantize is not None:
        quantization.check_quantize(quantize, group_size)
        quantization.check_target(quantize, group_size, device)
    source = _open(path)
    args = source.args(max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    mp = parallel.model_parallel_size()
    dtype = dtype or source.default_dtype()
    check_context_fits(args, dtype, device, path)  # before the RoPE table is built for max_seq_len
    try:
        with torch.device("meta"), _NoInit():
            model = Transformer(args)
    except parallel.ParallelError as e:
        raise CheckpointError(f"{path}: cannot split this model over {mp} model-parallel ranks: {e}") from None
    _check_unused(source, model.state_dict().keys())
    linears = {f"{name}.weight": name for name, _ in quantization.linear_layers(model)} if quantize else {}
    state = {}
    for name, param in model.state_dict().items():
        tied = name == "output.weight" and args.tie_word_embeddings
        if name in linears:  # the output layer of a tied model is quantized from the embedding table
            layer = _quantized_layer(source, "tok_embeddings.weight" if tied else name, linears[name], param.shape,
                                     args, quantize, group_size)
            quantization.replace_layer(model, linears[name], layer)
        elif name == "tok_embeddings.weight" and quantize and (table := _gguf_table(source, name, param.shape,
                                                                                     args, dtype)) is not None:
            model.tok_embeddings = table
        elif not tied:
            state[name] = _local_tensor(source, name, param.shape, args, dtype, fast=quantize is not None)
    if args.tie_word_embeddings and not quantize:
        state["output.weight"] = state["tok_embeddings.weight"]
    quantized = {k: v for k, v in model.state_dict().items() if not v.is_meta}  # the layers built above
    model.load_state_dict({**state, **quantized}, strict=True, assign=True)
    if args.tie_word_embeddings and not quantize:  # assign=True made two Parameters of one tensor; make them one again
        model.output.weight = model.tok_embeddings.weight
    return model.to(device) if device is not None else model


class _NoInit(TorchFunctionMode):
    """Building on the meta device there is nothing to initialise: the modules' random initialisation
    returns its tensor as it is (on meta tensors it runs torch's Python reference kernels, whose first
    use imports torch._dynamo: seconds of a load)."""

    SKIPPED = {torch.nn.init.normal_, torch.nn.init.uniform_, torch.nn.init.kaiming_uniform_, torch.nn.init.trunc_normal_,
               torch.Tensor.normal_, torch.Tensor.uniform_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.SKIPPED:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def _check_unused(source, wanted) -> None:
    extra = [k for k in source.keys() if k not in wanted and k not in _IGNORED_KEYS]
    if extra:
        raise CheckpointError(
            f"{source.path}: unexpected tensors {extra[:3]}{' ...' if len(extra) > 3 else ''}: the weights "
            f"do not match the model described by {source.args_file}"
        )


def _local_piece(source, name: str, local_shape, args: ModelArgs):
    """This rank's piece of `name` as the source stores it (a view where possible; a GGUF quantized
    tensor as `Blocks`), cut from the source shards and transformed; and the pieces it came from."""
    pieces = source.pieces(name)
    mp, rank = parallel.model_parallel_size(), parallel.model_parallel_rank()
    if name.endswith(("attention.wk.weight", "attention.wv.weight")):
        out = _kv_rows(source, name, pieces, args, rank, mp)
    else:
        full = list(parallel.full_shape(name, local_shape))
        src_dim = source.split_dim(name, pieces, full)
        _check_full_shape(source, name, pieces, src_dim, full)
        dim = parallel.shard_dim(name) if mp > 1 else None
        if dim is None:
            out = _cut(pieces, src_dim, None, 0, 0)
        else:
            n = full[dim] // mp
            out = _cut(pieces, src_dim, dim, rank * n, n)
    out = source.transform(name, out, args)
    if tuple(out.shape) != tuple(local_shape):  # a bug here, not bad input: the checks above came first
        raise AssertionError(f"{name}: built {tuple(out.shape)}, model expects {tuple(local_shape)}")
    return out, pieces


def _local_tensor(source, name: str, local_shape, args: ModelArgs, dtype, fast: bool = False) -> torch.Tensor:
    """This rank's piece of `name`: cut from the source shards, transformed, cast, contiguous."""
    out, pieces = _local_piece(source, name, local_shape, args)
    if isinstance(out, Blocks):
        if fast:
            _dequantize_fast(out)
        out = out.dequantize(dtype)
    elif out.dtype != dtype:
        out = out.to(dtype)
    out = out.contiguous()
    _release(source, pieces, keep=[out])
    return out


def _quantized_layer(source, name: str, layer: str, local_shape, args: ModelArgs, method: str, group_size):
    """This rank's piece of the weight `name`, straight into the quantized form of the linear layer
    `layer` (its module name, as quantize_model names it: "output", "layers.0.attention.wq"), in the
    layer's scheme (quantization.layer_scheme: int4 keeps the output projection in 8 bits): a GGUF
    file's own blocks where the scheme takes them as they are, else quantized a few rows at a time.
    An output matrix a file already holds in the body's 4-bit blocks stays as it is (8 bits would not
    restore what 4 lost)."""
    out, pieces = _local_piece(source, name, local_shape, args)
    body_kind = quantization.native_kind(method, group_size)
    method, group_size = quantization.layer_scheme(layer, method, group_size)
    if isinstance(out, Blocks) and out.qtype.name in (quantization.native_kind(method, group_size), body_kind):
        return quantization.GGUFLinear(out.data, out.qtype.name)  # a view of the file: nothing read yet
    _dequantize_fast(out)
    read = out.rows if isinstance(out, Blocks) else lambda start, end: out[start:end]
    group_size = quantization.DEFAULT_GROUP_SIZE[method] if group_size is None else group_size
    quantized = quantization.quantize_rows(read, tuple(out.shape), method, group_size, layer)
    _release(source, pieces, keep=list(quantized.buffers()))
    return quantized


def _gguf_table(source, name: str, local_shape, args: ModelArgs, dtype):
    """A quantized model's embedding table as the GGUF file's blocks (GGUFEmbedding), in one process;
    None for other sources (and under model parallelism, where the table is vocab-parallel)."""
    if parallel.model_parallel_size() > 1:
        return None
    out, _ = _local_piece(source, name, local_shape, args)
    if not isinstance(out, Blocks) or out.qtype.name not in quantization.GGUF_TYPE_IDS:
        return None
    return quantization.GGUFEmbedding(out.data, out.qtype.name, args.dim, dtype)


def _dequantize_fast(out) -> None:
    """Quantized loads have the kernels built: GGUF blocks of the types they read are dequantized there
    (~30x faster than gguf.quants' numpy; the same numbers, tests/test_load_quantized.py)."""
    if isinstance(out, Blocks) and out.qtype.name in quantization.GGUF_TYPE_IDS:
        out.fast = functools.partial(quantization.dequantize_gguf, kind=out.qtype.name)


def _release(source, pieces, keep) -> None:
    """Drop the mapped pages `pieces` were read from, unless one of `keep` is a view of them."""
    raw = [p.data if isinstance(p, Blocks) else p for p in pieces]
    if source.mmapped and not any(_shares_memory(k, p) for k in keep for p in raw):
        for p in raw:  # copied: the mapped source pages are no longer needed in this process
            release_pages(p)


def _check_full_shape(source, name, pieces, src_dim, full) -> None:
    found = list(pieces[0].shape)
    if src_dim is not None and len(found) == len(full):
        found[src_dim] = sum(p.shape[src_dim] for p in pieces)
    if found != full or any(p.shape != pieces[0].shape for p in pieces):
        hint = f"the weights do not match {source.args_file}"
        dim = parallel.shard_dim(name)  # a missing shard file leaves a fraction of the tensor along it
        if dim is not None and len(found) == len(full) and 0 < found[dim] < full[dim] and full[dim] % found[dim] == 0 \
                and found[:dim] + found[dim + 1:] == full[:dim] + full[dim + 1:]:
            k = full[dim] * len(pieces) // found[dim]
            hint = (f"the {len(pieces)} shard file(s) here hold {len(pieces)}/{k} of it: the checkpoint was saved in "
                    f"{k} shards (consolidated.00 .. {k - 1:02d}.pth); copy the missing ones")
        raise CheckpointError(f"{source.path}: tensor {name} has shape {tuple(found)}, the model expects "
                              f"{tuple(full)}: {hint}")


def _cut(pieces: List[torch.Tensor], src_dim, dim, start: int, length: int) -> torch.Tensor:
    """[start, start+length) along `dim` (None: everything) of the concatenation of `pieces` along
    `src_dim` (None: the pieces are copies). A view when a single piece covers it."""
    if src_dim is None or len(pieces) == 1:
        return pieces[0] if dim is None else pieces[0].narrow(dim, start, length)
    if dim is None:
        return _cat(pieces, src_dim)
    if dim != src_dim:  # e.g. Llama 2's embedding (split along dim 1) into vocab-parallel rows
        return _cat([p.narrow(dim, start, length) for p in pieces], src_dim)
    return _rows(pieces, dim, [(start, length)])


def _cat(parts, dim: int):
    return Blocks.cat(parts, dim) if isinstance(parts[0], Blocks) else torch.cat(parts, dim)


def _rows(pieces: List[torch.Tensor], dim: int, ranges) -> torch.Tensor:
    """Concatenate `ranges` [(start, length), ...] of the concatenation of `pieces` along `dim`."""
    parts, offset = [], 0
    bounds = []
    for p in pieces:
        bounds.append((offset, offset + p.shape[dim], p))
        offset += p.shape[dim]
    for start, length in ranges:
        end = start + length
        for lo, hi, p in bounds:
            if lo < end and start < hi:
                a, b = max(start, lo), min(end, hi)
                parts.append(p.narrow(dim, a - lo, b - a))
    return parts[0] if len(parts) == 1 else _cat(parts, dim)


def _kv_rows(source, name, pieces, args: ModelArgs, rank: int, mp: int) -> torch.Tensor:
    """Rows of wk/wv for this rank, one head (head_dim rows) at a time: the heads
    parallel.local_kv_heads gives it. Its shards store `stored` heads, n_kv_heads of them or, when
    saved at mp > n_kv_heads, each head repeated (consecutive copies)."""
    hd, n_kv = args.head_dim, args.n_kv_heads
    rows = sum(p.shape[0] for p in pieces)
    found = (rows, pieces[0].shape[1])
    stored = rows // hd
    if rows % hd or stored % n_kv or found[1] != args.dim or any(p.shape[1] != args.dim for p in pieces):
        raise CheckpointError(
            f"{source.path}: tensor {name} has shape {found}, the model expects {(n_kv * hd, args.dim)}: "
            f"the weights do not match {source.args_file}"
        )
    src_copies = stored // n_kv  # consecutive copies of each head in the source
    heads = [h * src_copies for h in parallel.local_kv_heads(n_kv, mp, rank)]  # the first copy of each
    ranges = []  # merge consecutive heads into one range, so a plain split stays a view
    for h in heads:
        if ranges and ranges[-1][0] + ranges[-1][1] == h * hd:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + hd)
        else:
            ranges.append((h * hd, hd))
    return _rows(pieces, 0, ranges)


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def release_pages(t: torch.Tensor) -> None:
    """Drop the (memory-mapped, read-only-used) pages under `t` from this process: the file keeps
    the data, and a later read faults it back in. Only whole pages inside `t` are released."""
    if _libc is None or t.device.type != "cpu" or t.numel() == 0:
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    lo, hi = (start + _PAGE - 1) // _PAGE * _PAGE, end // _PAGE * _PAGE
    if hi > lo:
        _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # MADV_DONTNEED


# ---------------------------------------------------------------------------- params


# ---------------------------------------------------------------------------- saving


