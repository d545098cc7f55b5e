"""Random weights of an official Llama shape, written in every format the loaders read, with no
download: the shapes are published facts (configs/models/), the values are normal(0, 0.02) and
norms 1. Every file holds the very same numbers (each tensor comes from a generator seeded by its
name), so llama-ref and llama.cpp read the same weights.

- GGUF (bf16/f16/f32) through the `gguf` package's writer, one tensor at a time (the 8B file is
  16 GB: never in memory at once); Q8_0, Q4_0, Q4_K ... by llama.cpp's own quantizer
  (`llama_model_quantize` via llama-cpp-python, its default choices: e.g. a Q4_0 file keeps its
  output matrix in Q6_K, as the files people download do).
- HF safetensors (bf16) in 5 GB shards with `model.safetensors.index.json` and config.json, and
  Meta's layout (params.json + consolidated.00.pth), both with the official Llama 3 tokenizer.model.

The GGUF files carry SmolLM2's tokenizer (llama.cpp needs one inside the file), padded with unused
tokens to the shape's vocabulary: the benchmark feeds token ids, so no text is ever tokenized with it.
"""

import ctypes
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from llama.checkpoint.gguf import GGUFFile, Q
from llama.checkpoint.hf import hf_name, params_to_config, to_rotate_half
from llama.common.assets import llama3_tokenizer, smollm2_gguf
from llama.common.files import write_text
from llama.model import ModelArgs, Transformer, rope_frequencies
from llama.plan import load_model_args

SHAPES = {"1b": "llama3.2-1b", "3b": "llama3.2-3b", "8b": "llama3.1-8b", "70b": "llama3.1-70b"}
# Meta key -> llama.cpp's (layer names with {})
_GGUF_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
               "output.weight": "output.weight", "attention.wq": "attn_q", "attention.wk": "attn_k",
               "attention.wv": "attn_v", "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate",
               "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up", "attention_norm": "attn_norm",
               "ffn_norm": "ffn_norm"}
LLAMACPP_TYPES = {"Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
                  "Q4_K": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "F16": "LLAMA_FTYPE_MOSTLY_F16"}


def shape_args(shape: str) -> ModelArgs:
    return load_model_args(SHAPES[shape])


def shapes(args: ModelArgs) -> dict:
    """Meta key -> shape, in the model's order (tied models have no output.weight)."""
    with torch.device("meta"):
        state = Transformer(args).state_dict()
    return {k: tuple(v.shape) for k, v in state.items() if not (k == "output.weight" and args.tie_word_embeddings)}


def tensor(name: str, shape: tuple) -> torch.Tensor:
    """The bf16 values of `name`: the same in every file, whatever order they are written in."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    seed = int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "little") & (2**63 - 1)
    gen = torch.Generator().manual_seed(seed)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)


def gguf_name(meta: str) -> str:
    if meta in _GGUF_NAMES:
        return _GGUF_NAMES[meta]
    _, layer, rest = meta.split(".", 2)  # layers.N.attention.wq.weight
    return f"blk.{layer}.{_GGUF_NAMES[rest.rsplit('.', 1)[0]]}.weight"


def _tokenizer_fields(vocab_size: int) -> dict:
    """SmolLM2's tokenizer keys, its token list padded with unused tokens to vocab_size."""
    md = GGUFFile(smollm2_gguf()).metadata
    tokens = list(md["tokenizer.ggml.tokens"])
    types = [int(t) for t in md["tokenizer.ggml.token_type"]]
    pad = vocab_size - len(tokens)
    tokens += [f"<|unused_{i}|>" for i in range(pad)]
    types += [5] * pad  # llama.cpp's UNUSED
    return {"model": md["tokenizer.ggml.model"], "pre": md["tokenizer.ggml.pre"], "tokens": tokens,
            "types": types, "merges": list(md["tokenizer.ggml.merges"]), "bos": 1, "eos": 2}


def write_gguf(args: ModelArgs, path: Path, kind: str = "BF16") -> Path:
    """A llama.cpp file of `args`'s shape with the random weights, streamed tensor by tensor: BF16/F16/F32,
    or Q4_0 / Q8_0 quantized by the gguf package (llama.cpp's arithmetic in numpy, every matrix: a file
    too large to write as bf16 first, such as 70B's)."""
    import gguf

    if path.exists():
        return path
    types = {"BF16": (Q.BF16, torch.bfloat16, np.uint16, 32), "F16": (Q.F16, torch.float16, np.float16, 1),
             "F32": (Q.F32, torch.float32, np.float32, 0), "Q4_0": (Q.Q4_0, None, np.uint8, 2),
             "Q8_0": (Q.Q8_0, None, np.uint8, 7)}
    qtype, dtype, np_dtype, file_type = types[kind]
    partial = Path(str(path) + ".partial")
    writer = gguf.GGUFWriter(str(partial), arch="llama")
    _add_metadata(writer, args, file_type)
    names = shapes(args)
    _write_tensors(writer, args, names, qtype, dtype, np_dtype)
    writer.close()
    partial.rename(path)
    return path


def _add_metadata(writer, args: ModelArgs, file_type: int) -> None:
    """llama.cpp's keys for a Llama model of `args`'s shape, and the padded SmolLM2 tokenizer."""
    writer.add_name(f"random weights of {args.dim}-wide Llama shape")
    writer.add_file_type(file_type)
    writer.add_context_length(args.context_length or 131072)
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(args.ffn_hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_key_length(args.head_dim)
    writer.add_value_length(args.head_dim)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_vocab_size(args.vocab_size)
    tok = _tokenizer_fields(args.vocab_size)
    writer.add_tokenizer_model(tok["model"])
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    writer.add_token_merges(tok["merges"])
    writer.add_bos_token_id(tok["bos"])
    writer.add_eos_token_id(tok["eos"])
    writer.add_add_bos_token(False)


def _write_tensors(writer, args, names, qtype, dtype, np_dtype) -> None:
    """The tensor index, then each tensor's data (made, written, dropped: one in memory at a time)."""
    import gguf

    extra = {}
    if args.use_scaled_rope:  # llama.cpp reads Llama 3.1's RoPE scaling from this tensor (divisors per frequency)
        plain = dataclasses.replace(args, use_scaled_rope=False)
        extra["rope_freqs.weight"] = (rope_frequencies(plain) / rope_frequencies(args)).float()
        writer.add_tensor_info("rope_freqs.weight", (args.head_dim // 2,), np.dtype(np.float32), args.head_dim * 2)
    for name, shape in names.items():  # 1-D norms stay F32, as llama.cpp's converter writes them
        n = int(np.prod(shape))
        if len(shape) == 1:
            writer.add_tensor_info(gguf_name(name), shape, np.dtype(np.float32), n * 4)
        elif dtype is None:  # quantized: the byte shape (rows, bytes per row)
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            byte_shape = (shape[0], shape[1] // block * size)
            writer.add_tensor_info(gguf_name(name), byte_shape, np.dtype(np.uint8), byte_shape[0] * byte_shape[1],
                                   raw_dtype=qtype)
        else:
            writer.add_tensor_info(gguf_name(name), shape, np.dtype(np_dtype), n * torch.finfo(dtype).bits // 8,
                                   raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in extra.values():
        writer.write_tensor_data(t.numpy())
    for name, shape in names.items():
        t = tensor(name, shape)
        if len(shape) == 1:
            writer.write_tensor_data(t.float().numpy())
        elif dtype is None:  # gguf.quants makes float copies: a few rows at a time
            _write_pieces(writer, (gguf.quants.quantize(t[start:start + 4096].float().numpy(), qtype)
                                   for start in range(0, shape[0], 4096)))
        else:
            t = t.to(dtype)
            writer.write_tensor_data((t.view(torch.int16) if dtype == torch.bfloat16 else t).numpy())
        del t


def _write_pieces(writer, pieces) -> None:
    """writer.write_tensor_data for one tensor given as consecutive pieces (its API takes whole arrays)."""
    import gguf

    out = writer.fout[0]
    writer.write_padding(out, out.tell())
    info = writer.tensors[0].pop(next(iter(writer.tensors[0])))
    written = 0
    for piece in pieces:
        piece.tofile(out)
        written += piece.nbytes
    assert written == info.nbytes, (written, info.nbytes)
    writer.write_padding(out, written)
    writer.state = gguf.gguf_writer.WriterState.WEIGHTS


def llamacpp_quantize(src: Path, dst: Path, kind: str, threads: int) -> Path:
    """llama.cpp's own quantizer (llama_model_quantize) with its default choices for `kind` (Q8_0, Q4_0, ...)."""
    import llama_cpp

    if not dst.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, LLAMACPP_TYPES.get(kind, kind))
        params.nthread = threads
        partial = Path(str(dst) + ".partial")
        if llama_cpp.llama_model_quantize(str(src).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama_model_quantize failed for {dst}")
        partial.rename(dst)
    return dst


def write_hf(args: ModelArgs, out: Path, max_shard_bytes: int = 2 * 2**30) -> Path:
    """An HF directory (bf16 safetensors shards + index + config.json + the Llama 3 tokenizer.model),
    written one shard at a time."""
    from safetensors.torch import save_file

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    names = shapes(args)
    groups, size = [[]], 0
    for name, shape in names.items():
        n = int(np.prod(shape)) * 2
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    weight_map = {}
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for name in group:
            t = tensor(name, names[name])
            if name.endswith(("attention.wq.weight", "attention.wk.weight")):
                t = to_rotate_half(t, args.head_dim).contiguous()
            shard[hf_name(name)] = t
            weight_map[hf_name(name)] = file
        partial = out / (file + ".partial")
        save_file(shard, str(partial), metadata={"format": "pt"})
        partial.rename(out / file)
        del shard
    write_text(out / "model.safetensors.index.json", json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    shutil.copyfile(llama3_tokenizer(), out / "tokenizer.model")
    write_text(out / "config.json", json.dumps(params_to_config(args), indent=2) + "\n")
    return out
