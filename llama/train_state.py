"""Training checkpoints: Meta's layout plus the state an exact resume needs, written atomically.

    out_dir/
      latest                  -> "step_000300": the newest COMPLETE checkpoint (written last)
      step_000300/
        params.json           ModelArgs (Meta's keys + hidden_dim/head_dim/tie_word_embeddings ...)
        consolidated.00.pth   model-parallel rank 0's state_dict: Meta's shard layout, fp32
        consolidated.01.pth   ... one per model-parallel rank
        tokenizer.model       a copy of the tokenizer (when it is a small file), so the dir stands alone
        train_state.00.pth    rank 0's optimizer, step, data position, RNG and config
      metrics.jsonl

A save goes to `.step_000300.tmp/`; every file in it is written under a temporary name, fsynced
and renamed; then the directory is renamed into place and only then is `latest` replaced (itself
a temp file + fsync + rename). A crash at any moment leaves `latest` naming a complete checkpoint.
generate.py, Llama.build and Meta's own loader read a step directory like any Meta checkpoint.
"""

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from llama import parallel

LATEST = "latest"
TOKENIZER_COPY_LIMIT = 64 << 20  # copy tokenizer files up to 64 MiB, link bigger ones


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """write(f) into `path.tmp`, fsync, rename over `path`: readers see the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def latest_checkpoint(out_dir) -> Optional[Path]:
    """The newest complete checkpoint in out_dir, or None."""
    pointer = Path(out_dir) / LATEST
    if not pointer.is_file():
        return None
    path = Path(out_dir) / pointer.read_text().strip()
    if not (path / "params.json").is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is incomplete or missing")
    return path


def params_json(args) -> dict:
    """ModelArgs as params.json: the run-time sizes are the loader's choice, not the checkpoint's."""
    params = dataclasses.asdict(args)
    for key in ("max_seq_len", "max_batch_size"):
        params.pop(key)
    return params


def save_checkpoint(out_dir, step: int, model, train_state: dict, tokenizer_path: Optional[str],
                    keep_last: int = 0, write_shards=None) -> Path:
    """Collective over all ranks. Data-parallel rank 0 of each model-parallel rank writes its shard;
    write_shards(tmp_dir, model, train_state), called on every rank, replaces that step (FSDP:
    llama/fsdp.py gathers the weights and writes the optimizer with DCP)."""
    out, name = Path(out_dir), step_name(step)
    tmp, final = out / f".{name}.tmp", out / name
    writer = parallel.data_parallel_rank() == 0
    first = dist.get_rank() == 0 if dist.is_initialized() else True
    mp_rank = parallel.model_parallel_rank()
    if first:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    if write_shards is not None:
        write_shards(tmp, model, train_state)
    elif writer:
        state = model.state_dict()
        atomic_write(tmp / f"consolidated.{mp_rank:02d}.pth", lambda f: torch.save(state, f))
        atomic_write(tmp / f"train_state.{mp_rank:02d}.pth", lambda f: torch.save(train_state, f))
    if first:
        params = json.dumps(params_json(model.params), indent=2).encode()
        atomic_write(tmp / "params.json", lambda f: f.write(params))
        _write_tokenizer(tmp, tokenizer_path)
    _barrier()
    if first:
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (a resumed run): move the old one aside first
            old = out / f".{name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(out)
        atomic_write(out / LATEST, lambda f: f.write(name.encode()))
        _fsync_dir(out)
        _prune(out, keep_last)
    _barrier()
    return final


def _write_tokenizer(directory: Path, tokenizer_path: Optional[str]) -> None:
    """tokenizer.model next to the weights, where loaders look (load_tokenizer detects the format
    from the contents): a copy of a small file, a link to a big one (a GGUF's tokenizer is inside
    its hundreds of MB of weights)."""
    if not tokenizer_path or not Path(tokenizer_path).is_file():
        return
    source = Path(tokenizer_path).resolve()
    if source.stat().st_size <= TOKENIZER_COPY_LIMIT:
        data = source.read_bytes()
        atomic_write(directory / "tokenizer.model", lambda f: f.write(data))
    else:
        os.symlink(source, directory / "tokenizer.model")


def _prune(out: Path, keep_last: int) -> None:
    """Delete all but the newest keep_last checkpoints (and temp dirs of interrupted saves)."""
    for stale in out.glob(".step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last <= 0:
        return
    steps = sorted(p for p in out.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, model, device) -> dict:
    """Load this rank's model shard in place; return its training state (optimizer etc.)."""
    mp_rank, mp = parallel.model_parallel_rank(), parallel.model_parallel_size()
    state_file = path / f"train_state.{mp_rank:02d}.pth"
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} has no {state_file.name}: it was not saved at model_parallel_size={mp}")
    train_state = torch.load(state_file, map_location=device, weights_only=True)
    saved_mp = train_state["model_parallel_size"]
    if saved_mp != mp:
        raise ValueError(f"{path} was saved at model_parallel_size={saved_mp}; resume with the same size "
                         f"(or start a new run with init_from={path})")
    weights = torch.load(path / f"consolidated.{mp_rank:02d}.pth", map_location=device, weights_only=True)
    model.load_state_dict(weights, strict=True)
    return train_state


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
