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


from llama import parallel
from llama.common.checks import check_device as parse_device
from llama.common.dtypes import DTypeError, dtype_name
from llama.common.errors import UserError
from llama.common.files import InputFileError, read_text_file
from llama.lora import LORA_DTYPES, check_settings
from llama.model import ModelArgs
from llama.model_args import ModelArgsError
from llama.train.limits import check_numbers, check_paths


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
    out_dir: str = "out/default"  # checkpoints (step_NNNNNN/), metrics.jsonl and the run's config go here
    seed: int = 1337  # weights, data order and sampling follow from it
    max_steps: int = 200  # optimizer steps in all (a resumed run continues up to it)
    log_every: int = 10  # print and record a metrics line every this many steps
    eval_every: int = 100  # validation loss every this many steps (0: never)
    eval_batches: int = 4  # global batches of the held-out split per evaluation
    eval_data: str = ""  # a text file: its perplexity (eval_ppl, strided windows of seq_len) at each evaluation
    save_every: int = 100  # checkpoint every this many steps (always at the end)
    keep_last: int = 2  # older checkpoints are deleted (0: keep all)
    resume: bool = False  # continue from out_dir/latest
    overwrite: bool = False  # a fresh run into an out_dir holding another run deletes that run (else: refused)
    init_from: str = ""  # Meta dir, HF dir, .gguf file or "smollm2" to fine-tune (empty: from scratch)
    # data
    data: str = "stdlib"  # "stdlib", a dir made by `python -m llama.data prepare`, or raw files
    sft: bool = False  # raw `data` is chat jsonl: loss on assistant tokens only
    tokenizer: str = ""  # a file or "llama3"; empty: init_from's, or a BPE trained on `data`
    data_cache: str = "out/data"  # where raw `data` is tokenized once (reruns reuse it)
    val_fraction: float = 0.02  # held-out share of tokens (of dialogs for SFT)
    seq_len: int = 128  # tokens per training sequence
    packing: bool = False  # several documents per row, each seeing only itself, RoPE positions from its start
    batch_size: int = 16  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 16  # sequences per forward pass per rank (the rest is accumulation)
    # optimizer: AdamW, linear warmup then cosine decay to min_lr
    lr: float = 3e-3  # peak learning rate, reached after warmup_steps
    min_lr: float = 3e-4  # the learning rate at the end of the cosine decay (not given, with lr given: lr / 10)
    warmup_steps: int = 20  # linear warmup from 0 to lr
    decay_steps: int = 0  # where the cosine reaches min_lr (0: at max_steps)
    weight_decay: float = 0.1  # AdamW's decoupled decay, on matrices only
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.95  # AdamW's second-moment decay
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)
    # system
    model_parallel_size: int = 1  # ranks each model is split over (torchrun); the rest is data parallel
    context_parallel_size: int = 1  # ranks each sequence is split over (llama/parallel/context.py; same weights)
    data_parallel: str = "ddp"  # "ddp": full copies per data-parallel rank; "fsdp": sharded (llama/train/fsdp.py)
    reshard_after_forward: bool = True  # fsdp: free gathered weights after forward (ZeRO-3); false: ZeRO-2
    data_parallel_size: int = 0  # the launch this recipe expects (0: processes / (model x context parallel)); llama.plan reads it
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # autocast dtype: auto = bfloat16 on CUDA, float32 (no autocast) on CPU
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute
    loss_chunks: int = 1  # > 1: output layer + loss on this many slices of the sequence, recomputed (less memory)
    peak_tflops: float = 0.0  # the device's peak for MFU (0: look the GPU up in a table)
    # LoRA (llama/lora.py, docs/lora.md): train low-rank adapters on a frozen base instead of every weight
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the adapters' input (training only)
    lora_targets: list = field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])  # projections that get adapters
    base_dtype: str = "auto"  # the frozen base's dtype under LoRA: auto = bfloat16 on CUDA, float32 on CPU
    # preference tuning (llama/train/dpo.py, docs/dpo.md): data of chosen/rejected replies (data prepare --pairs)
    objective: str = "lm"  # "lm": next-token cross-entropy (pretraining; SFT with sft=true); "dpo": preference pairs
    dpo_loss: str = "sigmoid"  # "sigmoid" (DPO), "ipo", or "simpo" (SimPO: no reference model)
    dpo_beta: float = 0.1  # DPO/IPO: the KL weight (smaller lets the policy move farther from the reference)
    simpo_gamma: float = 0.5  # SimPO's target margin between the chosen and rejected average log-probabilities
    dpo_sft_weight: float = 0.0  # > 0: + this x the chosen replies' mean token NLL (RPO; keeps them likely)
    # model shape (from scratch): model_config (a params.json file) or else DEFAULT_MODEL, with the
    # [model] keys on top
    model_config: str = ""  # a params.json-style file with the from-scratch shape (configs/models/)
    model: dict = field(default_factory=dict)  # [model] table / model.KEY=VALUE: ModelArgs fields on top

    def model_args(self, vocab_size: Optional[int] = None) -> ModelArgs:
        """The from-scratch shape; vocab_size comes from the tokenizer unless set explicitly."""
        shape = read_model_config(self.model_config) if self.model_config else dict(DEFAULT_MODEL)
        shape.update(self.model)
        if vocab_size is not None and "vocab_size" not in self.model:
            shape["vocab_size"] = vocab_size
        shape.update(max_seq_len=self.seq_len, max_batch_size=self.micro_batch_size)
        try:
            return ModelArgs(**shape)
        except ModelArgsError as e:  # name where the bad key came from: a [model] key or the file
            if e.key in self.model:
                raise e.at("config", {e.key: f"model.{e.key}"}) from None
            if e.key in ("max_seq_len", "max_batch_size"):
                raise e.at("config", {"max_seq_len": "seq_len", "max_batch_size": "micro_batch_size"}) from None
            given = ", ".join(f"model.{k}={v}" for k, v in self.model.items())
            raise e.at(f"model_config {self.model_config}" if self.model_config and not given else
                       f"the model shape ({self.model_config or 'the default'}{' with ' + given if given else ''})") from None


def read_model_config(path: str) -> dict:
    """A params.json-style file's keys (model_config), or a ConfigError naming the file."""
    try:
        shape = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"model_config {path} is not valid JSON ({e}): give a params.json-style file "
                          f"(see configs/models/)") from None
    except OSError as e:
        raise ConfigError(f"model_config {path} cannot be read ({e.strerror})") from None
    if not isinstance(shape, dict):
        raise ConfigError(f"model_config {path} holds a JSON {type(shape).__name__}, not an object of "
                          f"params.json keys (see configs/models/)")
    unknown = sorted(set(shape) - set(MODEL_FIELDS))
    if unknown:
        raise _unknown(unknown[0], list(MODEL_FIELDS), f"model_config {path}")
    return shape


# Names for the project's embedded assets (fetched once with pip, see llama/common/assets.py), usable as
# init_from / tokenizer values: real weights and the official tokenizer with no gated download.
ASSETS = {"smollm2": "smollm2_gguf", "llama3": "llama3_tokenizer"}


def asset_path(value: str) -> str:
    """An init_from / tokenizer value as a path (asset names are fetched on first use)."""
    if value in ASSETS:
        from llama.common import assets

        return str(getattr(assets, ASSETS[value])())
    return value


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def config_help() -> str:
    """Every config key with its default and its comment above (train.py --help): read from the
    source of TrainConfig, so the help cannot drift from the fields."""
    import inspect
    import re

    comments = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?(?:  # (.*))?$", line)
        if m:
            comments[m.group(1)] = m.group(2) or ""
    rows = []
    for name, f in FIELDS.items():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        rows.append(f"  {name} = {json.dumps(default)}" + "".ljust(max(1, 34 - len(name) - len(json.dumps(default))))
                    + comments.get(name, ""))
    model = ", ".join(f"{k}={v}" for k, v in DEFAULT_MODEL.items())
    rows.append(f"  model.KEY = VALUE: any ModelArgs field (Meta's params.json keys); the default shape is {model}")
    return "\n".join(rows)
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
            table = tomllib.loads(read_text_file(p, "config file"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        except InputFileError as e:
            raise ConfigError(f"{e}: a config is a TOML file (see configs/train/)") from None
        for key, value in table.items():
            _apply(values, key, value, str(path))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"argument {item!r} is not key=value (e.g. max_steps=100)")
        _apply(values, key.strip(), parse_value(text.strip()), "the command line")
    if "lr" in values and "min_lr" not in values and isinstance(values["lr"], float):
        values["min_lr"] = values["lr"] / 10  # the default's ratio: a lower lr alone never leaves min_lr above it
    if values.get("resume"):  # continue with the keys the run was started with (llama/train/state.py)
        values = resume_values(values, {k: getattr(TrainConfig(), k) for k in FIELDS})
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Checks that need no data, model or processes: run before any work starts."""
    check_numbers(cfg)
    check_paths(cfg)
    try:
        parse_device(cfg.device, "device", need_it_here=False)  # syntax only: a config naming cuda parses anywhere
    except UserError:
        raise ConfigError(f"device={cfg.device!r}: use auto, cpu, cuda or cuda:N") from None
    if cfg.dtype != "auto":
        try:
            cfg.dtype = dtype_name(cfg.dtype)  # one name from here on: bf16 -> bfloat16
        except DTypeError as e:
            raise ConfigError(f"{e}, or auto") from None
    if cfg.init_from and (cfg.model or cfg.model_config):
        raise ConfigError("init_from sets the model shape: remove model_config and the [model] keys")
    if cfg.model_config and not Path(cfg.model_config).is_file():
        raise ConfigError(f"model_config {cfg.model_config} does not exist (see configs/models/)")
    if cfg.init_from and cfg.init_from not in ASSETS and not Path(cfg.init_from).exists():
        raise ConfigError(f"init_from {cfg.init_from} does not exist: give a Meta dir, an HF dir, a .gguf file "
                          f"or one of {', '.join(ASSETS)}")
    if cfg.tokenizer and cfg.tokenizer not in ASSETS and not Path(cfg.tokenizer).exists():
        raise ConfigError(f"tokenizer {cfg.tokenizer} does not exist")
    if cfg.eval_data and not Path(cfg.eval_data).is_file():
        raise ConfigError(f"eval_data {cfg.eval_data} is not a file: give a text file to measure perplexity on")
    if cfg.data_parallel not in ("ddp", "fsdp"):
        raise ConfigError(f"data_parallel={cfg.data_parallel!r}: use \"ddp\" or \"fsdp\"")
    if not cfg.reshard_after_forward and cfg.data_parallel != "fsdp":
        raise ConfigError("reshard_after_forward=false (ZeRO-2) shards the model: it needs data_parallel=\"fsdp\"")
    check_lora_config(cfg)
    check_objective(cfg)
    if cfg.data != "stdlib" and not Path(cfg.data).exists():
        raise ConfigError(f"data {cfg.data} does not exist: give text/jsonl files, a directory, "
                          f"a prepared dir (python -m llama.data prepare) or 'stdlib'")
    if not cfg.init_from:  # the from-scratch shape, checked now rather than after tokenizing the data
        _check_parallel(cfg, cfg.model_args(vocab_size=64 * cfg.model_parallel_size))  # the tokenizer sets vocab later


def check_device(cfg: TrainConfig) -> None:
    """At the start of training (a config that names cuda still parses on a machine without one)."""
    try:
        parse_device(cfg.device, "device")
    except UserError as e:
        raise ConfigError(f"{e} (or auto)") from None


def _check_parallel(cfg: TrainConfig, args: ModelArgs) -> None:
    try:  # the model's own rule (llama/parallel/layout.py), with training's extra: no duplicated K/V heads
        parallel.check_model_parallel(args, cfg.model_parallel_size, training=True, flag="model_parallel_size=")
    except parallel.ParallelError as e:
        raise ConfigError(str(e)) from None


def check_lora_config(cfg: TrainConfig) -> None:
    if not isinstance(cfg.lora_targets, list) or not all(isinstance(t, str) for t in cfg.lora_targets):
        raise ConfigError(f"lora_targets must be a list of projection names, e.g. [\"wq\", \"wv\"], "
                          f"got {cfg.lora_targets!r}")
    if cfg.base_dtype not in LORA_DTYPES:
        raise ConfigError(f"base_dtype={cfg.base_dtype!r}: use {', '.join(LORA_DTYPES)}")
    check_settings(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)


DPO_LOSSES = ("sigmoid", "ipo", "simpo")


def check_objective(cfg: TrainConfig) -> None:
    if cfg.objective not in ("lm", "dpo"):
        raise ConfigError(f"objective={cfg.objective!r}: use \"lm\" (next-token loss) or \"dpo\" (preference pairs)")
    if cfg.dpo_loss not in DPO_LOSSES:
        raise ConfigError(f"dpo_loss={cfg.dpo_loss!r}: use one of {', '.join(DPO_LOSSES)}")
    if cfg.objective == "dpo" and cfg.sft:
        raise ConfigError("objective=\"dpo\" trains on preference pairs, sft=true on dialogs: drop sft")
    if cfg.objective == "dpo" and cfg.data == "stdlib":
        raise ConfigError("objective=\"dpo\" needs preference pairs: set data to a jsonl of "
                          "{\"prompt\", \"chosen\", \"rejected\"} lines (docs/dpo.md)")
    if cfg.objective == "dpo" and (cfg.packing or cfg.context_parallel_size > 1):  # a pair is two whole rows
        raise ConfigError("objective=\"dpo\" reads each pair as two whole rows: set packing=false and "
                          "context_parallel_size=1")


def check_layout(cfg: TrainConfig, args: ModelArgs, world_size: int) -> Tuple[int, int]:
    """(data-parallel ranks, micro-batch size) for this world size, or a one-line error why not.
    The micro-batch shrinks to a rank's share of the batch when that is smaller."""
    mp, cp = cfg.model_parallel_size, cfg.context_parallel_size
    sizes = f"model_parallel_size={mp}" + (f" x context_parallel_size={cp}" if cp > 1 else "")
    if mp * cp > world_size:
        raise ConfigError(f"{sizes} needs {mp * cp} processes: torchrun --nproc_per_node {mp * cp}")
    if world_size % (mp * cp) != 0:
        raise ConfigError(f"{sizes} does not divide the {world_size} processes: "
                          f"launch a multiple of {mp * cp} (torchrun --nproc_per_node)")
    _check_parallel(cfg, args)
    dp = world_size // (mp * cp)
    if cfg.data_parallel_size and dp != cfg.data_parallel_size:
        raise ConfigError(f"data_parallel_size={cfg.data_parallel_size} x {sizes} needs "
                          f"{cfg.data_parallel_size * mp * cp} processes, torchrun started {world_size}: fix --nnodes / "
                          f"--nproc-per-node (or data_parallel_size)")
    share = cfg.batch_size // dp
    micro = min(cfg.micro_batch_size, share)
    if cfg.batch_size % dp != 0 or share % micro != 0:
        raise ConfigError(f"batch_size={cfg.batch_size} must split evenly over {dp} data-parallel ranks and into "
                          f"micro-batches of {micro}: change batch_size or micro_batch_size")
    return dp, micro


# Keys a resumed run may change: how long, how often to log/evaluate/save, and how the same math
# runs (device, compile, recomputation, accumulation, context parallelism: every CP rank holds the
# whole model). Every other key is the run's saved value.
MAY_CHANGE_ON_RESUME = {"max_steps", "log_every", "eval_every", "save_every", "keep_last", "eval_batches",
                        "device", "compile", "activation_checkpointing", "micro_batch_size", "peak_tflops",
                        "resume", "out_dir", "overwrite", "context_parallel_size"}


def resume_values(values: dict, defaults: dict) -> dict:
    """The config values of a resumed run: those the run was started with (saved in its newest
    checkpoint's train_state.00.pth), plus the MAY_CHANGE_ON_RESUME keys from `values` (the keys the
    user gave). A key given again with another value is a ConfigError naming it; so is a max_steps
    the run has already reached. With no checkpoint yet, `values` are returned unchanged."""
    from llama.checkpoint import CheckpointError
    from llama.checkpoint.meta import load_torch_file
    from llama.train.state import check_out_dir, latest_checkpoint

    out_dir = values.get("out_dir", defaults["out_dir"])
    check_out_dir(out_dir, resume=True, overwrite=False)  # a folder another run is writing: refused first
    ckpt = latest_checkpoint(out_dir)
    if ckpt is None:
        return values
    state_file = ckpt / "train_state.00.pth"
    if not state_file.is_file():
        raise CheckpointError(f"{ckpt} has no train_state.00.pth: it is not a training checkpoint to resume")
    state = load_torch_file(state_file)  # checksummed: a damaged file is refused, not resumed
    saved = {k: v for k, v in state["config"].items() if k in defaults}
    where = f"the run's saved configuration ({state_file})"
    given = {k: v for k, v in values.items() if k != "model"}
    given.update({f"model.{k}": v for k, v in values.get("model", {}).items()})
    saved_flat = {**saved, **{f"model.{k}": v for k, v in saved.get("model", {}).items()}}
    for key, value in given.items():
        if key in MAY_CHANGE_ON_RESUME:
            continue
        was = saved_flat.get(key, defaults.get(key))
        if key in ("init_from", "tokenizer") and value:
            value = asset_path(value)
        if value != was:
            hint = ""
            if key == "model_parallel_size":
                hint = (f"; to continue at model_parallel_size={value}, convert it first (python -m llama.convert "
                        f"{ckpt} NEW --to meta --shards {value}) and start a new run with init_from=NEW")
            raise ConfigError(f"resume=true: {key}={value!r} differs from {key}={was!r} in {where}: drop {key} "
                              f"to continue the run, or start a new run in another out_dir{hint}")
    merged = {**saved, "overwrite": False,  # the run may have started with overwrite=true: resuming never deletes
              **{k: v for k, v in values.items() if k in MAY_CHANGE_ON_RESUME}, "resume": True}
    max_steps = merged.get("max_steps", defaults["max_steps"])
    if max_steps <= state["step"]:
        raise ConfigError(f"resume=true: the run in {out_dir} is already at step {state['step']} and "
                          f"max_steps={max_steps}: give a larger max_steps to continue it")
    return merged
