"""Hugging Face's layout: config.json + model.safetensors (or shards named in an index).

Two differences from Meta's layout besides the names:
- config.json names the shapes differently (hidden_size, intermediate_size, rope_scaling ...);
  transformers 5 writes the RoPE settings as `rope_parameters` (rope_theta inside), 4.x as
  `rope_theta` + `rope_scaling`: we read both and write both.
- wq/wk rows are permuted for the rotate-half RoPE HF uses: within each head, Meta's interleaved
  pairs (x0, x1), (x2, x3) ... become first halves then second halves. The permutation never
  crosses a head, so it can be undone on any whole-head slice of a model-parallel shard.
"""

import json
import re
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from llama.checkpoint.common import CheckpointError, model_args_from_dict
from llama.common.files import atomic_write, write_text
from llama.model import ModelArgs

# Meta key (with {} for the layer) <-> HF key.
_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.feed_forward.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.feed_forward.w2.weight": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.feed_forward.w3.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
}
_TO_META = {re.escape(hf).replace(r"\{\}", r"(\d+)"): meta for meta, hf in _NAMES.items()}
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def hf_name(meta: str) -> str:
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", meta)
    return _NAMES[f"layers.{{}}.{m.group(2)}"].format(m.group(1)) if m else _NAMES[meta]


def meta_name(hf: str) -> str:
    """HF key -> Meta key; keys we don't know come back unchanged (and are reported as unexpected)."""
    for pattern, meta in _TO_META.items():
        m = re.fullmatch(pattern, hf)
        if m:
            return meta.format(*m.groups())
    return hf


def from_rotate_half(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """HF q/k rows -> Meta's: per head, rows [re_0..re_{d/2-1}, im_0..] -> [re_0, im_0, re_1, ...]."""
    return w.view(-1, 2, head_dim // 2, w.shape[-1]).transpose(1, 2).reshape(w.shape)


def to_rotate_half(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    return w.view(-1, head_dim // 2, 2, w.shape[-1]).transpose(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------- config


# ModelArgs field -> the config.json key it comes from (errors name the key the file has)
HF_NAMES = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
            "n_kv_heads": "num_key_value_heads", "hidden_dim": "intermediate_size", "norm_eps": "rms_norm_eps",
            "rope_scaling_factor": "rope_scaling.factor", "rope_low_freq_factor": "rope_scaling.low_freq_factor",
            "rope_high_freq_factor": "rope_scaling.high_freq_factor",
            "rope_original_max_seq_len": "rope_scaling.original_max_position_embeddings"}


def config_to_params(cfg: dict, file: Path) -> dict:
    """config.json -> a params.json-style dict (ModelArgs field names)."""
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file}: holds a JSON {type(cfg).__name__}, not an object of config keys")
    arch = cfg.get("model_type")
    if arch != "llama":
        raise CheckpointError(f"{file}: model_type {arch!r} is not supported: only 'llama' checkpoints load here")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise CheckpointError(f"{file}: attention/MLP biases are not part of Llama: this model cannot load here")
    try:
        p = dict(
            dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"], vocab_size=cfg["vocab_size"],
            hidden_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise CheckpointError(f"{file}: key {e} is missing") from None
    if cfg.get("max_position_embeddings"):
        p["context_length"] = cfg["max_position_embeddings"]
    if cfg.get("head_dim"):
        p["head_dim"] = cfg["head_dim"]
    rope = dict(cfg.get("rope_parameters") or {})  # transformers 5.x
    rope.update(cfg.get("rope_scaling") or {})  # transformers 4.x
    # values go to ModelArgs as written: its check names a "big" or a 2.5 with the key below
    p["rope_theta"] = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "llama3":
        p.update(use_scaled_rope=True, rope_scaling_factor=rope.get("factor"),
                 rope_low_freq_factor=rope.get("low_freq_factor", 1.0),
                 rope_high_freq_factor=rope.get("high_freq_factor", 4.0),
                 rope_original_max_seq_len=rope.get("original_max_position_embeddings", 8192))
    elif kind != "default":
        raise CheckpointError(f"{file}: RoPE scaling type {kind!r} is not supported (only 'llama3' is)")
    if "context_length" in p and p["context_length"] == _implied_context(p):
        del p["context_length"]  # what params_to_config writes for an unknown one: keep it unknown
    return p


def _implied_context(p):
    """The context length written when the source states none: Llama 3.1-scaled RoPE implies original
    length x factor; otherwise unknown (None: max_position_embeddings is omitted). `p`: ModelArgs or
    its dict."""
    get = p.get if isinstance(p, dict) else lambda k, d=None: getattr(p, k)
    if get("use_scaled_rope", False):
        return int(get("rope_original_max_seq_len", 8192) * get("rope_scaling_factor", 8.0))
    return None


def params_to_config(args: ModelArgs) -> dict:
    """ModelArgs -> config.json that transformers 4.x and 5.x both read as LlamaForCausalLM."""
    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    # The source's context length; when unknown (a Meta params.json has none), the implied one.
    max_pos = args.context_length or _implied_context(args)
    if args.use_scaled_rope:
        rope.update(rope_type="llama3", factor=args.rope_scaling_factor, low_freq_factor=args.rope_low_freq_factor,
                    high_freq_factor=args.rope_high_freq_factor,
                    original_max_position_embeddings=args.rope_original_max_seq_len)
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"} if args.use_scaled_rope else None
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "hidden_act": "silu",
        "max_position_embeddings": max_pos, "tie_word_embeddings": args.tie_word_embeddings,
        "attention_bias": False, "mlp_bias": False,
        "rope_theta": args.rope_theta, "rope_scaling": scaling, "rope_parameters": rope,
    }
    if max_pos is None:
        del config["max_position_embeddings"]
    return config


# ---------------------------------------------------------------------------- reading


class HFSource:
    """The loader's view of an HF dir: full tensors (one 'shard'), memory-mapped by safetensors."""

    n_shards, mmapped = 1, True

    def __init__(self, path: Path):
        self.path = path
        self.args_file = path / "config.json"
        if not self.args_file.exists():
            raise CheckpointError(f"{path}: config.json is missing: HF checkpoints need it next to the .safetensors")
        files = sorted(path.glob("*.safetensors"))
        index = path / "model.safetensors.index.json"
        if index.exists():
            try:
                names = set(json.loads(index.read_text())["weight_map"].values())
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            files = [path / n for n in sorted(names)]
            for f in files:
                if not f.exists():
                    raise CheckpointError(f"{index}: lists {f.name}, which is missing: download it again")
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors weight files (PyTorch .bin files are not read: convert them)")
        self._where = {}
        self._handles = []
        for f in files:
            try:
                handle = safe_open(str(f), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({e}): download it again") from None
            self._handles.append(handle)
            for key in handle.keys():
                self._where[meta_name(key)] = (handle, key)

    def args(self, **overrides) -> ModelArgs:
        try:
            cfg = json.loads(self.args_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.args_file}: not valid JSON ({e})") from None
        params = config_to_params(cfg, self.args_file)
        if "output.weight" not in self._where and not params["tie_word_embeddings"]:
            params["tie_word_embeddings"] = True  # no lm_head stored: transformers would tie too
        return model_args_from_dict(params, self.args_file, HF_NAMES, **overrides)

    def keys(self):
        return [k for k in self._where if not k.endswith("rotary_emb.inv_freq")]

    def pieces(self, name: str):
        if name not in self._where:
            raise CheckpointError(f"{self.path}: tensor {hf_name(name)} is missing from the safetensors files")
        handle, key = self._where[name]
        try:
            return [handle.get_tensor(key)]
        except SafetensorError as e:
            raise CheckpointError(f"{self.path}: cannot read {key} ({e}): the file is corrupt") from None

    def split_dim(self, name, pieces, full_shape):
        return None

    def transform(self, name, tensor, args):
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            return from_rotate_half(tensor, args.head_dim)
        return tensor

    def default_dtype(self):
        return self.pieces("tok_embeddings.weight")[0].dtype if "tok_embeddings.weight" in self._where else torch.float32


# ---------------------------------------------------------------------------- writing


def _write_safetensors(path: Path, tensors: dict) -> None:
    """The safetensors format, streamed one tensor at a time: u64 header length, a JSON header of
    {name: dtype, shape, byte range}, then the raw little-endian bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned

    def write(f):
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors.values():
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")

    atomic_write(path, write)


def save_hf(state_dict, params: ModelArgs, out_dir, dtype=None, max_shard_bytes: int = 5 * 2**30) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in state_dict.items():
        if name == "output.weight" and params.tie_word_embeddings:
            continue
        t = t.to(dtype) if dtype is not None else t
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            t = to_rotate_half(t, params.head_dim)
        tensors[hf_name(name)] = t
    groups, size = [[]], 0  # files of at most max_shard_bytes (a larger tensor gets its own)
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    files = ["model.safetensors"] if len(groups) == 1 else [
        f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for file, names in zip(files, groups):
        _write_safetensors(out_dir / file, {n: tensors[n] for n in names})
    for old in [*out_dir.glob("model-*-of-*.safetensors"), out_dir / "model.safetensors",
                out_dir / "model.safetensors.index.json"]:
        if old.exists() and old.name not in files and (len(files) == 1 or old.name != "model.safetensors.index.json"):
            old.unlink()  # left by an earlier save with a different split; it would be read too
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {n: f for f, names in zip(files, groups) for n in names}}
        text = json.dumps(index, indent=2)
        write_text(out_dir / "model.safetensors.index.json", text)
    text = json.dumps(params_to_config(params), indent=2) + "\n"
    write_text(out_dir / "config.json", text)
