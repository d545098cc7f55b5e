"""GGUF (llama.cpp's single-file format): a small header reader, the metadata -> ModelArgs map,
and tensors dequantized through the `gguf` package.

Layout of a GGUF file (little-endian, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):

    "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x (key: string, type: u32, value)          metadata, tokenizer included
    n_tensors x (name: string, n_dims u32, ne: u64[n_dims], type u32, offset u64)
    padding to `general.alignment` (32) | tensor data

`gguf.GGUFReader` parses every token string of the tokenizer into its own numpy view, which takes
~11 s for a 49k-token vocabulary; this reader does the same walk with `struct` in well under a
second and hands the tensor bytes to `gguf.quants.dequantize`.

Facts of the format that matter here: `ne` lists dimensions innermost first, so a PyTorch
(out_features, in_features) weight has ne = [in, out]; llama.cpp's converter already undid HF's
rotate-half permutation of wq/wk, so q/k are in Meta's interleaved RoPE layout; a model with tied
embeddings has no `output.weight` tensor.
"""

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import gguf

from llama.model import ModelArgs, rope_frequencies
from llama.common.errors import UserError
from llama.model_args import ModelArgsError
from llama.checkpoint.common import CheckpointError

# Metadata value types: type id -> struct format (STRING=8 and ARRAY=9 are handled separately).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}

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


class GGUFFormatError(UserError):
    pass


@dataclass
class TensorInfo:
    name: str
    shape: tuple  # PyTorch order (outermost first): ne reversed
    qtype: int  # a gguf.GGMLQuantizationType value (may be unknown to the package)
    offset: int  # absolute byte offset in the file
    n_bytes: int


class GGUFFile:
    """The metadata (a dict of Python values / numpy arrays) and tensor index of one .gguf file."""

    def __init__(self, path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            # ACCESS_COPY: a private, copy-on-write map, so tensors viewing it are writable and a
            # caller that trains them never writes to the file.
            self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._pos = 0
        try:
            self._parse()
        except (struct.error, IndexError, UnicodeDecodeError, OverflowError, ValueError) as e:
            if isinstance(e, GGUFFormatError):
                raise
            raise GGUFFormatError(f"corrupt or truncated GGUF header ({e})") from None

    # -- low-level reads at self._pos
    def _read(self, fmt: str):
        (value,) = struct.unpack_from("<" + fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._read("Q")
        if self._pos + n > len(self._buf):
            raise GGUFFormatError("corrupt or truncated GGUF header (a string runs past the end)")
        s = self._buf[self._pos : self._pos + n].decode("utf-8", errors="replace")
        self._pos += n
        return s

    def _value(self, vtype: int):
        if vtype in _SCALARS:
            return self._read(_SCALARS[vtype])
        if vtype == 8:
            return self._string()
        if vtype == 9:
            etype, count = self._read("I"), self._read("Q")
            if etype in _NUMPY:  # numeric arrays (token types, scores) in one read
                arr = np.frombuffer(self._buf, dtype=_NUMPY[etype], count=count, offset=self._pos)
                self._pos += arr.nbytes
                return arr
            return [self._value(etype) for _ in range(count)]
        raise GGUFFormatError(f"unknown metadata value type {vtype}")

    def _parse(self):
        if self._buf[:4] != b"GGUF":
            raise GGUFFormatError("not a GGUF file (the first 4 bytes are not 'GGUF')")
        self._pos = 4
        version = self._read("I")
        if version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {version} is not supported (2 and 3 are; big-endian files are not)")
        n_tensors, n_kv = self._read("Q"), self._read("Q")
        self.metadata = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._read("I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            ne = [self._read("Q") for _ in range(self._read("I"))]
            infos.append((name, tuple(reversed(ne)), self._read("I"), self._read("Q")))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = (self._pos + align - 1) // align * align
        self.tensors = {}
        for name, shape, qtype, offset in infos:
            n_bytes = _byte_size(name, shape, qtype)
            if data_start + offset + n_bytes > len(self._buf):
                raise GGUFFormatError(f"truncated: tensor {name} ends past the end of the file")
            self.tensors[name] = TensorInfo(name, shape, qtype, data_start + offset, n_bytes)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor in PyTorch layout: zero-copy for F32/F16/BF16, dequantized to float32 otherwise."""
        info = self.tensors[name]
        qtype = Q(info.qtype)
        if qtype in _TORCH:
            raw = torch.frombuffer(self._buf, dtype=torch.uint8, count=info.n_bytes, offset=info.offset)
            return raw.view(_TORCH[qtype]).view(info.shape)
        raw = np.frombuffer(self._buf, dtype=np.uint8, count=info.n_bytes, offset=info.offset)
        rows = raw.reshape(_n_rows(info.shape), -1)  # (rows, bytes per row): blocks never span rows
        return torch.from_numpy(gguf.quants.dequantize(rows, qtype)).view(info.shape)


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
    """The loader's view of a .gguf file: one 'shard' holding full tensors, under Meta's names."""

    n_shards, mmapped = 1, False  # quantized tensors are dequantized into fresh memory

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
        return [self.file.tensor(self._names[name])]

    def split_dim(self, name, pieces, full_shape):
        return None

    def transform(self, name, tensor, args):
        return tensor

    def default_dtype(self):
        emb = self.file.tensors.get("token_embd.weight")
        return _TORCH.get(emb.qtype, torch.float32) if emb else torch.float32
