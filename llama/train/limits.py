"""What a training config may hold, checked where it is read (llama/train/config.py's validate): the
range of every number (RANGES: a new int or float key needs an entry, tests/test_bad_inputs.py
checks), and the paths a run reads and writes (an output is never an input: llama/common/files.py).
"""

from pathlib import Path

from llama.common.checks import check_number, check_seed
from llama.common.errors import ArgumentError
from llama.common.files import OutputError, check_not_input

# key -> check_number's keywords (llama/common/checks.py: finite, whole where it must be, in range).
# The seed has its own rule (check_seed).
RANGES = {
    "max_steps": dict(low=1, integer=True), "log_every": dict(low=1, integer=True),
    "eval_every": dict(low=0, integer=True), "eval_batches": dict(low=1, integer=True),
    "save_every": dict(low=0, integer=True), "keep_last": dict(low=0, integer=True),
    "val_fraction": dict(low=0, high=1, high_open=True), "seq_len": dict(low=1, integer=True),
    "batch_size": dict(low=1, integer=True), "micro_batch_size": dict(low=1, integer=True),
    "lr": dict(low=0), "min_lr": dict(low=0), "warmup_steps": dict(low=0, integer=True),
    "decay_steps": dict(low=0, integer=True), "weight_decay": dict(low=0),
    "beta1": dict(low=0, high=1, high_open=True), "beta2": dict(low=0, high=1, high_open=True),
    "grad_clip": dict(low=0), "model_parallel_size": dict(low=1, integer=True),
    "context_parallel_size": dict(low=1, integer=True),
    "data_parallel_size": dict(low=0, integer=True), "loss_chunks": dict(low=1, integer=True),
    "peak_tflops": dict(low=0), "lora_rank": dict(low=0, integer=True),
    "lora_alpha": dict(low=0, low_open=True), "lora_dropout": dict(low=0, high=1, high_open=True),
    "dpo_beta": dict(low=0, low_open=True), "simpo_gamma": dict(), "dpo_sft_weight": dict(low=0),
}


def check_numbers(cfg) -> None:
    check_seed("seed", cfg.seed)
    for key, limits in RANGES.items():
        check_number(key, getattr(cfg, key), **limits)
    if cfg.min_lr > cfg.lr:
        raise ArgumentError(f"min_lr={cfg.min_lr} is above lr={cfg.lr}: the cosine decays from lr down to "
                            f"min_lr; lower min_lr (e.g. lr / 10)")


OUTPUT_KEYS = ("out_dir", "data_cache")  # what a run writes (data_cache: only for raw data)
INPUT_KEYS = ("data", "tokenizer", "init_from", "eval_data", "model_config")  # what it reads


def check_paths(cfg) -> None:
    """out_dir (and data_cache, where raw data is tokenized) are outputs: never empty, never a file,
    never an input, a folder holding one or inside one (llama/common/files.py's rule)."""
    if not cfg.out_dir.strip():
        raise OutputError('out_dir="" is empty: name a folder for the run\'s checkpoints, e.g. out_dir=out/my-run')
    if Path(cfg.out_dir).exists() and not Path(cfg.out_dir).is_dir():
        raise OutputError(f"out_dir={cfg.out_dir} is a file, not a directory: choose a folder for the run")
    if cfg.resume and cfg.overwrite:
        raise OutputError("resume=true continues the run in out_dir, overwrite=true deletes it: drop one of them")
    raw_data = cfg.data != "stdlib" and not (Path(cfg.data) / "meta.json").is_file()
    inputs = [getattr(cfg, key) for key in INPUT_KEYS if getattr(cfg, key) != "stdlib"]
    for key in OUTPUT_KEYS if raw_data else OUTPUT_KEYS[:1]:
        check_not_input(getattr(cfg, key), inputs, key)
