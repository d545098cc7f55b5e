"""LoRA in the training run: attach and freeze, and checkpoints that hold the adapters only.

    out_dir/step_000030/
      adapter_config.json        PEFT's files (llama/checkpoint/peft.py): `peft` loads the directory as it is,
      adapter_model.safetensors  `--lora` merges it here (generate.py, Llama.build, llama.convert)
      lora.json                  the base: its path and the sha256 of its params (checked on resume/merge)
      adapter.NN.pth             model-parallel rank NN's adapter shard, fp32: what resume loads
      train_state.NN.pth         optimizer (adapters only), step, data position, RNG, config
      optimizer.NN/              data_parallel="fsdp": the adapters' AdamW state, a DCP directory
                                 (llama/train/fsdp.py) in place of the one in train_state
      params.json, tokenizer.model   the base's shape and tokenizer, as in a full checkpoint

Megabytes, not gigabytes: the base is read again from its own files. The directory is built in a
temporary sibling and renamed into place, then `latest` is replaced, as llama/train/state.py does for
full checkpoints (with the same helpers from llama/common/files.py).
"""

import functools
import json
from pathlib import Path

import torch

from llama import lora, parallel
from llama.checkpoint import peft
from llama.checkpoint.meta import load_torch_file
from llama.common.dtypes import training_dtype
from llama.common.files import atomic_write
from llama.train import fsdp
from llama.train.state import save_checkpoint


def base_pointer(cfg, model) -> dict:
    """What the adapters were trained on: the base's files, or the seed of a from-scratch base."""
    pointer = {"path": str(Path(cfg.init_from).resolve()) if cfg.init_from else None,
               "params_sha256": peft.params_sha256(model.params)}
    if not cfg.init_from:
        pointer["init_seed"] = cfg.seed
    return pointer


def attach(cfg, model, device: torch.device) -> None:
    """Fresh adapters on `cfg.lora_targets`, the base frozen and cast to `base_dtype`."""
    dtype = lora.base_dtype_for(cfg.base_dtype, device)
    if dtype != torch.float32 and training_dtype(cfg.dtype, device) != dtype:  # the autocast dtype
        raise lora.LoRAError(f"base_dtype={cfg.base_dtype} needs autocast in the same dtype: set dtype="
                             f"{str(dtype).removeprefix('torch.')} (or base_dtype=float32)")
    lora.add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, seed=cfg.seed)
    lora.freeze_base(model, dtype)


def save_adapter_checkpoint(out_dir, step: int, model, train_state: dict, tokenizer_path, keep_last: int,
                            base: dict, optimizer=None) -> Path:
    """Collective over all ranks: train/state.py's atomic save, with the adapters (and the PEFT pair,
    whose export gathers the full adapters over model parallel) in place of the weights. With
    `optimizer` (FSDP) its state goes to optimizer.NN/ through DCP instead of train_state."""
    return save_checkpoint(out_dir, step, model, train_state, tokenizer_path, keep_last,
                           write_shards=functools.partial(write_adapter_shards, base=base, optimizer=optimizer))


def write_adapter_shards(tmp: Path, model, train_state: dict, base: dict, optimizer=None) -> None:
    device = fsdp.local(next(model.parameters())).device  # gathers stay on the device (NCCL)
    local = fsdp.gathered_state_dict(model, keep=True, select=lora.is_lora_name, device=device)  # whole over DP
    full = peft.export_training_adapter(local)  # every rank takes part in the gathers
    if parallel.is_checkpoint_writer():
        mp_rank = parallel.model_parallel_rank()
        atomic_write(tmp / f"adapter.{mp_rank:02d}.pth", lambda f: torch.save(local, f))
        atomic_write(tmp / f"train_state.{mp_rank:02d}.pth", lambda f: torch.save(train_state, f))
    if optimizer is not None:
        fsdp.save_optimizer(tmp, model, optimizer)
    if parallel.is_first_rank():
        cfg = model.lora
        peft.save_peft(tmp, full, model.params, cfg["rank"], cfg["alpha"], cfg["dropout"], cfg["targets"], base)


def load_adapter_checkpoint(path: Path, model, optimizer, device, base: dict) -> dict:
    """Load this rank's adapter shard (each FSDP rank keeps its piece) and the optimizer state in
    place, after checking the base; return the training state."""
    mp_rank, mp = parallel.model_parallel_rank(), parallel.model_parallel_size()
    shard = path / f"adapter.{mp_rank:02d}.pth"
    if not shard.is_file():
        raise lora.LoRAError(f"{path} has no {shard.name}: it is not a LoRA checkpoint saved at "
                             f"model_parallel_size={mp} (set lora_rank to the run's, or start a new out_dir)")
    saved = json.loads((path / peft.BASE_POINTER).read_text())
    if saved.get("params_sha256") != base["params_sha256"]:
        raise lora.LoRAError(f"{path} holds adapters for the base {saved.get('path')}, which does not match "
                             f"this run's base {base['path']}: resume with the same init_from")
    train_state = load_torch_file(path / f"train_state.{mp_rank:02d}.pth", map_location=device)  # checksummed
    if train_state["model_parallel_size"] != mp:
        raise lora.LoRAError(f"{path} was saved at model_parallel_size={train_state['model_parallel_size']}; "
                             f"resume with the same size")
    state = load_torch_file(shard, map_location=device)
    missing = set(lora.adapter_state(model)) ^ set(state)
    if missing:
        raise lora.LoRAError(f"{path}: its adapters do not match this run's lora_targets/rank "
                             f"(e.g. {sorted(missing)[0]}): resume with the run's LoRA settings")
    fsdp.copy_full_tensors(model, state)  # the base came from init_from; adapters only here
    if fsdp.is_fsdp_checkpoint(path):  # resharded by DCP to this run's data-parallel size
        fsdp.load_optimizer(path, model, optimizer)
    else:
        optimizer.load_state_dict(train_state["optimizer"])
    return train_state
