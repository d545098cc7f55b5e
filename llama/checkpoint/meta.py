"""Meta's checkpoint layout: params.json + consolidated.NN.pth, one file per model-parallel rank.

Each .pth is a zip-format torch pickle of {Meta key: this rank's shard}. We open every shard with
`torch.load(mmap=True, weights_only=True)`: the pickle may only rebuild tensors and plain
containers (a file crafted to run code on load is refused), and the tensor bytes stay in the file
until something reads them.
"""

import json
import mmap
import pickle
import re
import struct
import zipfile
import zlib
from pathlib import Path

import torch

from llama import parallel
from llama.checkpoint.common import CheckpointError, model_args_from_dict, params_json
from llama.common.errors import one_line
from llama.common.files import atomic_write, write_text
from llama.model import ModelArgs

_SHARD = re.compile(r"consolidated\.(\d+)\.pth")


_VERIFIED = set()  # (path, size, mtime, inode) of files whose checksums passed in this process


def check_crc(file: Path) -> None:
    """Refuse a zip-format .pth whose bytes do not match the CRC-32 its archive stores per member.

    torch.load(mmap=True) never reads most tensor bytes, so flipped bytes would load silently and
    generate garbage. Each member is checksummed in place in the memory-mapped file (~0.12-0.16 s per
    100 MB from the page cache here, docs/reliability-files.md); a file that passed is not read
    again by this process unless it changes (size, mtime, inode)."""
    st = file.stat()
    key = (str(file.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key in _VERIFIED or not zipfile.is_zipfile(file):
        return  # legacy (pre-1.6) torch files have no checksums
    try:
        with zipfile.ZipFile(file) as archive, open(file, "rb") as f, \
                mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                for info in archive.infolist():
                    _check_member(archive, info, view)
            finally:
                view.release()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: corrupt checkpoint, its bytes do not match the archive's checksums "
                              f"({str(e)[:120]}): download or copy it again") from None
    _VERIFIED.add(key)


def _check_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, view: memoryview) -> None:
    """CRC-32 of one member. torch stores members uncompressed: checksum them in place in the mapped
    file (no copy, ~1 GB/s); anything compressed goes through zipfile, which checks at the end."""
    if info.compress_type != zipfile.ZIP_STORED:
        with archive.open(info) as member:
            while member.read(1 << 24):
                pass
        return
    header = view.obj[info.header_offset : info.header_offset + 30]  # bytes: no view outlives the map
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {info.filename}")
    start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    if start + info.compress_size > len(view):
        raise zipfile.BadZipFile(f"{info.filename} runs past the end of the file")
    crc = 0
    for at in range(start, start + info.compress_size, 1 << 26):
        with view[at : min(at + (1 << 26), start + info.compress_size)] as chunk:
            crc = zlib.crc32(chunk, crc)
    if crc != info.CRC:
        raise zipfile.BadZipFile(f"Bad CRC-32 for file {info.filename!r}")


def load_torch_file(file: Path, map_location="cpu"):
    """Any .pth this project reads (weights, a training state, adapters): checksummed (check_crc),
    memory-mapped where the format allows, weights_only. However a file is damaged (empty, cut
    short, garbage, flipped bytes) or unsafe, the error is one CheckpointError naming it."""
    file = Path(file)
    if file.is_file() and file.stat().st_size == 0:
        raise CheckpointError(f"{file} is empty (0 bytes): a copy or download was cut short: get the file again")
    check_crc(file)
    try:
        try:
            return torch.load(file, map_location=map_location, mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e) or zipfile.is_zipfile(file):
                raise
            return torch.load(file, map_location=map_location, weights_only=True)  # legacy (pre-1.6) format
    except pickle.UnpicklingError as e:
        # weights_only's unpickler names the global it refused; anything else is a damaged file
        refused = re.search(r"Unsupported global[^\n]*", str(e))
        if refused:
            raise CheckpointError(
                f"{file}: refused to load: the pickle asks for more than tensors ({refused.group(0)[:160]}); "
                f"such a file can run code when unpickled. Get the weights from a source you trust"
            ) from None
        raise CheckpointError(f"{file}: corrupt or truncated checkpoint (not a torch pickle): download it again") from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, TypeError, AttributeError,
            OverflowError, struct.error) as e:  # a damaged legacy (non-zip) pickle fails in any of these ways
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise  # a missing or unreadable path: the caller's message (USER_ERRORS) names it
        raise CheckpointError(f"{file}: corrupt or truncated checkpoint ({one_line(e)[:160]}): download it again") from None


def load_pth(file: Path) -> dict:
    """A state dict from a .pth, checksummed, memory-mapped, refusing anything but tensors."""
    sd = load_torch_file(file)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{file}: not a state dict of tensors (a training-state file?): pass a consolidated.NN.pth dir")
    return sd


def shard_files(path: Path):
    files = sorted((int(m.group(1)), f) for f in path.iterdir() if (m := _SHARD.fullmatch(f.name)))
    if not files:
        raise CheckpointError(f"{path}: no consolidated.NN.pth weight files: is this the checkpoint directory?")
    numbers = [n for n, _ in files]
    if numbers != list(range(len(files))):
        raise CheckpointError(f"{path}: shard files are numbered {numbers}, expected 0..{len(files) - 1}: a shard is missing")
    return [f for _, f in files]


class MetaSource:
    """The loader's view of a Meta checkpoint dir: N shards, each split along SHARD_DIM."""

    mmapped = True

    def __init__(self, path: Path):
        self.path = path
        self.args_file = path / "params.json"
        if not self.args_file.exists():
            raise CheckpointError(f"{path}: params.json is missing: Meta checkpoints need it next to consolidated.NN.pth")
        self.files = shard_files(path)
        self.n_shards = len(self.files)
        self.shards = [load_pth(f) for f in self.files]

    def args(self, **overrides) -> ModelArgs:
        try:
            params = json.loads(self.args_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.args_file}: not valid JSON ({e})") from None
        if not isinstance(params, dict):
            return model_args_from_dict(params, self.args_file)  # refuses it, naming the file
        params.setdefault("rope_theta", 10000.0)  # Llama 2 omits it; Meta's Llama 2 code used 10000
        first = self.shards[0]
        emb = first.get("tok_embeddings.weight")
        vocab = params.get("vocab_size", -1)
        if isinstance(vocab, int) and vocab <= 0 and emb is not None:  # Llama 2: -1, the tokenizer decides
            split1 = self.n_shards > 1 and emb.shape[1] != params.get("dim")
            params["vocab_size"] = emb.shape[0] * (1 if split1 else self.n_shards)
        if "output.weight" not in first and "tie_word_embeddings" not in params:
            params["tie_word_embeddings"] = True
        return model_args_from_dict(params, self.args_file, **overrides)

    def keys(self):
        return list(self.shards[0].keys())

    def pieces(self, name: str):
        missing = [f.name for f, sd in zip(self.files, self.shards) if name not in sd]
        if missing:
            raise CheckpointError(f"{self.path}: tensor {name} is missing from {', '.join(missing)}")
        return [sd[name] for sd in self.shards]

    def split_dim(self, name, pieces, full_shape):
        if self.n_shards == 1:
            return None
        if name == "tok_embeddings.weight":  # Llama 3 splits the vocabulary (dim 0), Llama 2 the width
            return 0 if pieces[0].shape[1] == full_shape[1] else 1
        return parallel.shard_dim(name)

    def transform(self, name, tensor, args):
        return tensor

    def default_dtype(self):
        return self.shards[0]["tok_embeddings.weight"].dtype if "tok_embeddings.weight" in self.shards[0] else torch.float32


def kv_shard(full: torch.Tensor, n_kv_heads: int, rank: int, n_shards: int) -> torch.Tensor:
    """Rank `rank`'s rows of wk/wv (n_kv_heads*head_dim, dim). With more ranks than heads each head is
    stored once per rank that uses it, as Meta's 405B MP16 release does."""
    return parallel.shard("attention.wk.weight", full, rank, n_shards, n_kv_heads=n_kv_heads)


def save_meta(state_dict, params: ModelArgs, out_dir, num_shards: int = 1, dtype=None) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_shardable(state_dict, params, num_shards, out_dir)
    for rank in range(num_shards):
        shard = {}
        for name, full in state_dict.items():
            if name == "output.weight" and params.tie_word_embeddings:
                continue
            if name.endswith(("attention.wk.weight", "attention.wv.weight")):
                piece = kv_shard(full, params.n_kv_heads, rank, num_shards)
            else:
                piece = parallel.shard(name, full, rank, num_shards)
            # an own, compact storage: torch.save writes a view's whole underlying storage
            shard[name] = piece.to(dtype or piece.dtype).clone(memory_format=torch.contiguous_format)
        if params.tie_word_embeddings:  # stored once, under both keys, so Meta's strict load works
            shard["output.weight"] = shard["tok_embeddings.weight"]
        atomic_write(out_dir / f"consolidated.{rank:02d}.pth", lambda f: torch.save(shard, f))
        del shard
    write_text(out_dir / "params.json", params_json(params))
    for f in out_dir.glob("consolidated.*.pth"):  # a previous save with more shards would be mixed in
        if (m := _SHARD.fullmatch(f.name)) and int(m.group(1)) >= num_shards:
            f.unlink()


def _check_shardable(state_dict, params: ModelArgs, n: int, out_dir: Path) -> None:
    if n < 1:
        raise CheckpointError(f"{out_dir}: --shards must be at least 1, got {n}")
    for name, t in state_dict.items():
        dim = parallel.shard_dim(name)
        size = t.shape[0] // params.head_dim if name.endswith(("wk.weight", "wv.weight")) else None
        if name.endswith(("wk.weight", "wv.weight")) and n <= params.n_kv_heads and size % n:
            raise CheckpointError(f"{out_dir}: n_kv_heads={size} is not divisible by {n} shards: pick a divisor")
        if dim is not None and size is None and t.shape[dim] % n:
            raise CheckpointError(
                f"{out_dir}: {name} dim {dim} ({t.shape[dim]}) is not divisible by {n} shards: pick a divisor"
            )
    try:  # whole heads per shard, K/V heads by the rule the model loads them with
        parallel.check_model_parallel(params, n)
    except parallel.ParallelError as e:
        raise CheckpointError(f"{out_dir}: cannot split this model into {n} shards: {e}") from None
