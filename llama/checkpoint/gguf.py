"""GGUF (llama.cpp's single-file format): the tensors of a file whose header
llama/common/gguf_header.py reads, the metadata -> ModelArgs map, and dequantization through the
`gguf` package.

Nothing is read until it is used: F32/F16/BF16 tensors are views of the memory-mapped file, and a
quantized tensor is `Blocks`, a view of its bytes that the loader cuts (model parallelism) and then
dequantizes a few rows at a time, or hands as it is to the Q8_0/Q4_0 kernels (--quantize).

Facts of the format that matter here: `ne` lists dimensions innermost first, so a PyTorch
(out_features, in_features) weight has ne = [in, out]; llama.cpp's converter already undid HF's
rotate-half permutation of wq/wk, so q/k are in Meta's interleaved RoPE layout; a model with tied
embeddings has no `output.weight` tensor.
"""

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import gguf

from llama.model import ModelArgs, rope_frequencies
from llama.common.gguf_header import GGUFFormatError, GGUFHeader
from llama.model_args import ModelArgsError
from llama.checkpoint.common import CheckpointError

# Types we load. Unquantized ones map straight onto torch dtypes (zero-copy from the file).
Q = gguf.GGMLQuantizationType
SUPPORTED = {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}
_TORCH = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}

# llama.cpp tensor names -> Meta's state-dict keys.
_LAYER_NAMES = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
}
_TOP_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
              "output.weight": "output.weight"}
IGNORED = {"rope_freqs.weight"}  # Llama 3.1's precomputed RoPE scaling, checked in model_args()


@dataclass
class TensorInfo:
    name: str
    shape: tuple  # PyTorch order (outermost first): ne reversed
    qtype: int  # a gguf.GGMLQuantizationType value (may be unknown to the package)
    offset: int  # absolute byte offset in the file
    n_bytes: int


class GGUFFile(GGUFHeader):
    """The metadata and the checked tensor index (`tensors`: name -> TensorInfo) of one .gguf file."""

    def __init__(self, path):
        super().__init__(path)
        self.tensors = {}
        for name, shape, qtype, offset in self.index:
            n_bytes = _byte_size(name, shape, qtype)
            if offset + n_bytes > len(self._buf):
                raise GGUFFormatError(f"truncated: tensor {name} ends past the end of the file")
            self.tensors[name] = TensorInfo(name, shape, qtype, offset, n_bytes)

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes in the file, uint8, not read yet (a view of the map; of a read-only map
        for a file larger than the memory the OS commits: see GGUFHeader)."""
        info = self.tensors[name]
        with warnings.catch_warnings():  # read-only: only the kernels read these (stored() copies floats)
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            return torch.frombuffer(self._buf, dtype=torch.uint8, count=info.n_bytes, offset=info.offset)

    def stored(self, name: str):
        """The tensor as stored: F32/F16/BF16 a tensor in PyTorch layout, quantized types `Blocks`;
        both views of the file (floats copied from a read-only map: a model may write its floats)."""
        info = self.tensors[name]
        qtype = Q(info.qtype)
        if qtype in _TORCH:
            t = self.raw(name).view(_TORCH[qtype]).view(info.shape)
            return t if self.writable else t.clone()
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        return Blocks(self.raw(name).view(_n_rows(info.shape), info.shape[-1] // block, type_size), qtype, info.shape)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor in PyTorch layout: zero-copy for F32/F16/BF16, dequantized to float32 otherwise."""
        t = self.stored(name)
        return t.dequantize(torch.float32) if isinstance(t, Blocks) else t


class Blocks:
    """A quantized GGUF tensor still in its blocks: uint8 `data` (rows, blocks per row, bytes per block),
    a view of the file, standing for the float tensor of `shape` (rows, columns). `narrow` and `cat`
    cut whole blocks (what model parallelism needs: a rank's rows, or its share of the columns; a
    share that splits a block is cut from the dequantized tensor instead)."""

    def __init__(self, data: torch.Tensor, qtype, shape, fast=None):
        self.data, self.qtype, self.shape = data, Q(qtype), torch.Size(shape)
        self.block = gguf.GGML_QUANT_SIZES[self.qtype][0]  # weights per block
        self.fast = fast

    def narrow(self, dim: int, start: int, length: int) -> "Blocks":
        shape = list(self.shape)
        shape[dim] = length
        if dim == 0:
            return Blocks(self.data.narrow(0, start, length), self.qtype, shape, self.fast)
        if start % self.block or length % self.block:  # not at a block boundary: the float columns
            return self.dequantize(torch.float32).narrow(1, start, length)
        return Blocks(self.data.narrow(1, start // self.block, length // self.block), self.qtype, shape, self.fast)

    @staticmethod
    def cat(parts, dim: int) -> "Blocks":
        shape = list(parts[0].shape)
        shape[dim] = sum(p.shape[dim] for p in parts)
        return Blocks(torch.cat([p.data for p in parts], dim), parts[0].qtype, shape, parts[0].fast)

    def rows(self, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) dequantized to float32 (gguf.quants: llama.cpp's own arithmetic, in numpy),
        or by `self.fast` (a C++ dequantizer for this type, set by the loader when it has one)."""
        if self.fast is not None:
            return self.fast(self.data[start:end])
        raw = self.data[start:end].contiguous().view(end - start, -1).numpy()  # blocks never span rows
        return torch.from_numpy(gguf.quants.dequantize(raw, self.qtype)).view(end - start, self.shape[1])

    def dequantize(self, dtype, rows_at_once: int = 1 << 22) -> torch.Tensor:
        """The float tensor, built a few rows at a time (gguf.quants makes several float copies of
        what it is given: the whole 8B output matrix at once would take ~10 GB)."""
        out = torch.empty(self.shape, dtype=dtype)
        step = max(1, rows_at_once // self.shape[1])
        for start in range(0, self.shape[0], step):
            end = min(start + step, self.shape[0])
            out[start:end] = self.rows(start, end)
        return out


def _n_rows(shape) -> int:
    n = 1
    for d in shape[:-1]:
        n *= d
    return n


def _byte_size(name: str, shape, qtype: int) -> int:
    try:
        qt = Q(qtype)
    except ValueError:
        raise GGUFFormatError(f"tensor {name} has unknown quantization type id {qtype}") from None
    if qt not in SUPPORTED:
        names = ", ".join(t.name for t in sorted(SUPPORTED))
        raise GGUFFormatError(f"tensor {name} uses quantization type {qt.name}, which is not supported ({names} are)")
    block, type_size = gguf.GGML_QUANT_SIZES[qt]
    if shape[-1] % block:
        raise GGUFFormatError(f"tensor {name}: row length {shape[-1]} is not a multiple of the {qt.name} block {block}")
    return _n_rows(shape) * shape[-1] // block * type_size


def meta_key(gguf_name: str):
    """'blk.3.attn_q.weight' -> 'layers.3.attention.wq.weight'; None for names we don't know."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    return None


# ModelArgs field -> the GGUF metadata key it comes from (errors name the key the file has)
GGUF_NAMES = {"dim": "llama.embedding_length", "n_layers": "llama.block_count", "n_heads": "llama.attention.head_count",
              "n_kv_heads": "llama.attention.head_count_kv", "hidden_dim": "llama.feed_forward_length",
              "head_dim": "llama.attention.key_length", "norm_eps": "llama.attention.layer_norm_rms_epsilon",
              "rope_theta": "llama.rope.freq_base", "vocab_size": "llama.vocab_size"}


def model_args(g: GGUFFile, **overrides) -> ModelArgs:
    """Map llama.cpp's metadata keys onto ModelArgs."""
    md = g.metadata
    arch = md.get("general.architecture")
    if arch != "llama":
        raise GGUFFormatError(f"architecture {arch!r} is not supported: only 'llama' GGUF files load here")

    def get(key, default=None):
        value = md.get(f"llama.{key}", default)
        if value is None:
            raise GGUFFormatError(f"metadata key llama.{key} is missing")
        return value

    n_heads = int(get("attention.head_count"))
    dim = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", dim // max(n_heads, 1)))
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise GGUFFormatError("partial RoPE (rope.dimension_count < head width) is not a Llama model")
    emb = g.tensors.get("token_embd.weight")
    vocab = md.get("llama.vocab_size") or (emb.shape[0] if emb else len(md.get("tokenizer.ggml.tokens", [])))
    kwargs = dict(
        dim=dim, n_layers=int(get("block_count")), n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)), vocab_size=int(vocab),
        hidden_dim=int(get("feed_forward_length")), head_dim=head_dim,
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in g.tensors,
    )
    if md.get("llama.context_length"):
        kwargs["context_length"] = int(md["llama.context_length"])
    kwargs.update(_rope_scaling(g, kwargs))
    kwargs.update(overrides)
    return ModelArgs(**kwargs)


def _rope_scaling(g: GGUFFile, kwargs: dict) -> dict:
    """Llama 3.1 GGUFs carry the scaled RoPE as a tensor of per-frequency divisors (rope_freqs);
    recover the 3.1 constants from it and check they reproduce it exactly."""
    if "rope_freqs.weight" not in g.tensors:
        return {}
    factors = g.tensor("rope_freqs.weight").float()

    orig = int(g.metadata.get("llama.rope.scaling.original_context_length", 8192))
    scaled = dict(use_scaled_rope=True, rope_scaling_factor=float(factors.max()), rope_original_max_seq_len=orig)
    probe = ModelArgs(**{**kwargs, **scaled})
    plain = ModelArgs(**{**kwargs, "use_scaled_rope": False})
    expected = rope_frequencies(plain) / rope_frequencies(probe)  # the divisor per frequency
    if not torch.allclose(expected, factors, rtol=1e-3):
        raise GGUFFormatError("rope_freqs.weight is not Llama 3.1's RoPE scaling (low/high freq factors 1 and 4)")
    return scaled


class GGUFSource:
    """The loader's view of a .gguf file: one 'shard' holding full tensors, under Meta's names; each a
    view of the mapped file (quantized ones as `Blocks`)."""

    n_shards, mmapped = 1, True

    def __init__(self, path):
        self.path = Path(path)
        self.args_file = f"{self.path.name}'s metadata"
        self.file = GGUFFile(self.path)
        self._names = {meta_key(n) or n: n for n in self.file.tensors}

    def args(self, **overrides) -> ModelArgs:

        try:
            return model_args(self.file, **overrides)
        except GGUFFormatError as e:
            raise CheckpointError(f"{self.path}: {e}") from None
        except ModelArgsError as e:
            raise e.at(f"{self.path} metadata", GGUF_NAMES) from None

    def keys(self):
        return list(self._names)

    def pieces(self, name: str):
        if name not in self._names:

            raise CheckpointError(f"{self.path}: tensor {name} is missing (the file is incomplete or not a Llama model)")
        return [self.file.stored(self._names[name])]

    def split_dim(self, name, pieces, full_shape):
        return None

    def transform(self, name, tensor, args):
        return tensor

    def default_dtype(self):
        emb = self.file.tensors.get("token_embd.weight")
        return _TORCH.get(emb.qtype, torch.float32) if emb else torch.float32
