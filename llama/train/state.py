"""Training checkpoints: Meta's layout plus the state an exact resume needs, written atomically.

    out_dir/
      latest                  -> "step_000300": the newest COMPLETE checkpoint (written last)
      step_000300/
        params.json           ModelArgs (Meta's keys + hidden_dim/head_dim/tie_word_embeddings ...)
        consolidated.00.pth   model-parallel rank 0's state_dict: Meta's shard layout, fp32
        consolidated.01.pth   ... one per model-parallel rank
        tokenizer.model       a copy of the tokenizer (tokenizer.json + tokenizer_config.json for HF and
                              GGUF tokenizers, chat template included), so the dir stands alone
        train_state.00.pth    rank 0's optimizer, step, data position, RNG and config
      metrics.jsonl

A save goes to `.step_000300.tmp/`; every file in it is written under a temporary name, fsynced
and renamed (llama/common/files.py); then the directory is renamed into place and only then is `latest`
replaced (itself a temp file + fsync + rename). A crash at any moment leaves `latest` naming a
complete checkpoint. Only directories this module made are ever removed (temporaries carry a
marker; pruning and re-saving touch only step_NNNNNN directories holding a training state).
generate.py, Llama.build and Meta's own loader read a step directory like any Meta checkpoint.
"""

import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from llama import parallel
from llama.checkpoint import CheckpointError, params_json
from llama.checkpoint.meta import load_torch_file
from llama.common.errors import UserError
from llama.common.files import (atomic_write, check_not_locked, fsync_dir, lock_dir, make_temp_dir, remove_stale_temps,
                                remove_temp_dir, replace_dir, unlock_dir, write_text)
from llama.tokenizer import save_tokenizer

LATEST = "latest"
_STEP = re.compile(r"step_\d{6}")


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
        raise CheckpointError(f"{pointer} names {path.name}, which is incomplete or missing: "
                              f"point it at a complete step_NNNNNN directory, or start without resume=true")
    return path


BUSY = "wait for that run to finish, or choose another out_dir"  # the fix when another process writes out_dir


class RunFolderError(UserError):
    """out_dir holds another run, or another process is writing it."""


def earlier_run(out_dir) -> Optional[str]:
    """What in out_dir shows that a run has saved there (its `latest`, a checkpoint), or None. A
    user's folder that is only named like a step is not a run."""
    out = Path(out_dir)
    if (out / LATEST).is_file():
        return f"latest = {(out / LATEST).read_text().strip()}"
    steps = sorted(p.name for p in out.glob("step_*") if is_training_checkpoint(p)) if out.is_dir() else []
    return steps[-1] if steps else None


def check_out_dir(out_dir, resume: bool, overwrite: bool) -> None:
    """A fresh run never saves over another run's checkpoints (a shorter run's pruning would delete
    its own, `latest` would name a foreign step): continue it, replace it, or choose another folder."""
    if os.environ.get("RANK", "0") == "0":  # rank 0 takes the lock, so it alone asks (never of its own job)
        check_not_locked(out_dir, BUSY)  # a live run's folder: say so first, before reading what it replaces
    found = earlier_run(out_dir)
    if found and not resume and not overwrite:
        raise RunFolderError(f"out_dir={out_dir} holds another run ({found}): continue it with resume=true, start "
                             f"over with overwrite=true (its checkpoints are deleted), or choose another out_dir")


def claim_out_dir(out_dir, resume: bool, overwrite: bool) -> None:
    """Before the run writes (global rank 0): make out_dir and lock it for this process, so that a second
    run into it refuses (release_out_dir, or the process's end, frees it); check it again under the
    lock; with overwrite=true delete the earlier run's checkpoints, `latest` and metrics."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock_dir(out, BUSY)
    check_out_dir(out, resume, overwrite)
    if overwrite and not resume:
        (out / LATEST).unlink(missing_ok=True)  # first: never a `latest` naming a deleted step
        for step in out.glob("step_*"):
            if is_training_checkpoint(step):  # only what a run wrote; anything else stays
                shutil.rmtree(step)
        remove_stale_temps(out, ".step_*.tmp*")
        (out / "metrics.jsonl").unlink(missing_ok=True)


def release_out_dir(out_dir) -> None:
    unlock_dir(out_dir)


def is_training_checkpoint(path: Path) -> bool:
    """A step directory this module wrote (the only kind it ever replaces or prunes)."""
    return (path.is_dir() and not path.is_symlink() and _STEP.fullmatch(path.name) is not None
            and (path / "params.json").is_file() and (path / "train_state.00.pth").is_file())


def save_checkpoint(out_dir, step: int, model, train_state: dict, tokenizer_path: Optional[str],
                    keep_last: int = 0, write_shards=None) -> Path:
    """Collective over all ranks. One data-parallel rank of each model-parallel rank writes its shard
    (parallel.is_checkpoint_writer);
    write_shards(tmp_dir, model, train_state), called on every rank, replaces that step (FSDP:
    llama/train/fsdp.py gathers the weights and writes the optimizer with DCP)."""
    out, name = Path(out_dir), step_name(step)
    tmp, final = out / f".{name}.tmp", out / name
    writer, first = parallel.is_checkpoint_writer(), parallel.is_first_rank()
    mp_rank = parallel.model_parallel_rank()
    if first:
        if final.exists() and not is_training_checkpoint(final):
            raise CheckpointError(f"{final} exists and is not a checkpoint of this run: move it away "
                                  f"or choose another out_dir")
        remove_temp_dir(tmp)  # left by a killed save (it carries our marker; anything else stays)
        if tmp.exists():
            raise CheckpointError(f"{tmp} exists and was not made by a save: move it away")
        make_temp_dir(final, tmp.name)  # a fixed name (no pid): every rank must find it
    _barrier()
    if write_shards is not None:
        write_shards(tmp, model, train_state)
    elif writer:
        state = model.state_dict()
        atomic_write(tmp / f"consolidated.{mp_rank:02d}.pth", lambda f: torch.save(state, f))
        atomic_write(tmp / f"train_state.{mp_rank:02d}.pth", lambda f: torch.save(train_state, f))
    if first:
        write_text(tmp / "params.json", params_json(model.params))
        if tokenizer_path and Path(tokenizer_path).exists():
            save_tokenizer(tokenizer_path, tmp)
    _barrier()
    if first:
        replace_dir(tmp, final)  # a re-saved step (a resumed run): the old one is removed once replaced
        write_text(out / LATEST, name)
        fsync_dir(out)
        _prune(out, keep_last, keep=final)
    _barrier()
    return final


def _prune(out: Path, keep_last: int, keep: Path) -> None:
    """Delete all but the newest keep_last checkpoints (and temp dirs of interrupted saves); only
    directories this module wrote are ever removed, and never `keep` (the one just saved)."""
    remove_stale_temps(out, ".step_*.tmp*")
    if keep_last <= 0:
        return
    steps = sorted(p for p in out.glob("step_*") if is_training_checkpoint(p))
    for old in steps[:-keep_last]:
        if old.name != keep.name:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, model, device) -> dict:
    """Load this rank's model shard in place; return its training state (optimizer etc.)."""
    mp_rank, mp = parallel.model_parallel_rank(), parallel.model_parallel_size()
    saved_mp = len(list(path.glob("train_state.*.pth")))
    if saved_mp == 0:
        raise CheckpointError(f"{path} has no train_state.NN.pth: it is not a training checkpoint to resume; "
                              f"start a new run with init_from={path}")
    if saved_mp != mp:
        raise CheckpointError(
            f"{path} was saved at model_parallel_size={saved_mp}, this run has {mp}: resume with "
            f"model_parallel_size={saved_mp}, or convert it (python -m llama.convert {path} NEW --to meta "
            f"--shards {mp}) and start a new run with init_from=NEW")
    state_file = path / f"train_state.{mp_rank:02d}.pth"
    train_state = load_torch_file(state_file, map_location=device)  # checksummed, as generate.py's loads are
    weights = load_torch_file(path / f"consolidated.{mp_rank:02d}.pth", map_location=device)
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
