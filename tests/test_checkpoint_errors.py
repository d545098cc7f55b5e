"""Bad input gets one CheckpointError naming the file, the problem and the fix; a pickle that would
run code is refused. Through the command lines (generate, train's resume), an empty, truncated,
garbage or bit-flipped file of every format is one `error:` line naming it."""

import json
import random
import struct
from pathlib import Path

import pytest
import torch

import train as train_script
from llama import checkpoint
from llama.checkpoint import CheckpointError, load_model
from llama.generation import cli as generate_cli
from tests.helpers import TINY_TRAIN, run_main, tiny_model, write_gguf
from tests.test_bad_inputs import make_adapter, small_checkpoint


def _pwned(marker):  # what the malicious pickle would call
    open(marker, "w").write("ran")


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_pwned, (self.marker,))


@pytest.fixture
def meta_dir(tmp_path):
    model, args = tiny_model()
    checkpoint.save_meta(model.state_dict(), args, tmp_path / "meta")
    return tmp_path / "meta"


def test_malicious_pickle_is_refused(meta_dir, tmp_path):
    marker = tmp_path / "marker"
    sd = torch.load(meta_dir / "consolidated.00.pth", weights_only=True)
    sd["norm.weight"] = Exploit(str(marker))
    torch.save(sd, meta_dir / "consolidated.00.pth")
    torch.load(meta_dir / "consolidated.00.pth", weights_only=False)  # the file really runs code...
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: refused to load.*run code"):
        load_model(meta_dir)  # ...but not here
    assert not marker.exists()


def test_missing_params_json(meta_dir):
    (meta_dir / "params.json").unlink()
    with pytest.raises(CheckpointError, match="params.json is missing"):
        load_model(meta_dir)


def test_missing_config_json(meta_dir, tmp_path):
    model, args = tiny_model()
    checkpoint.save_hf(model.state_dict(), args, tmp_path / "hf")
    (tmp_path / "hf" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_model(tmp_path / "hf")


def test_no_weight_files(meta_dir, tmp_path):
    (meta_dir / "consolidated.00.pth").unlink()
    with pytest.raises(CheckpointError, match="no consolidated.NN.pth weight files"):
        load_model(meta_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty: no weights found"):
        load_model(tmp_path / "empty")


def test_shape_mismatch_names_tensor_and_shapes(meta_dir):
    params = json.loads((meta_dir / "params.json").read_text())
    params["hidden_dim"] = 128  # the file holds 96-wide FFN weights
    (meta_dir / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match=r"tensor layers\.0\.feed_forward\.w1\.weight has shape \(96, 64\), "
                                              r"the model expects \(128, 64\)"):
        load_model(meta_dir)


@pytest.mark.parametrize("fmt", ["meta", "hf"])
def test_truncated_and_corrupt_files(fmt, tmp_path):
    model, args = tiny_model()
    save = checkpoint.save_meta if fmt == "meta" else checkpoint.save_hf
    save(model.state_dict(), args, tmp_path / fmt)
    file = tmp_path / fmt / ("consolidated.00.pth" if fmt == "meta" else "model.safetensors")
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{file.name}: corrupt or truncated"):
        load_model(tmp_path / fmt)
    for seed in range(20):  # garbage fails the unpickler in many ways (IndexError, KeyError, ...): each one line
        file.write_bytes(random.Random(seed).randbytes(len(data)))
        with pytest.raises(CheckpointError, match=f"{file.name}: corrupt or truncated"):
            load_model(tmp_path / fmt)


def test_unknown_gguf_architecture_and_quantization(tmp_path):
    model, args = tiny_model()
    with pytest.raises(CheckpointError, match=r"gpt2.gguf: architecture 'gpt2' is not supported"):
        load_model(write_gguf(tmp_path / "gpt2.gguf", model.state_dict(), args, arch="gpt2"))
    path = write_gguf(tmp_path / "q.gguf", model.state_dict(), args)
    data = bytearray(path.read_bytes())
    # the first tensor info: name, n_dims, dims, then its type id (F32 = 0): make it 99 / IQ2_XXS (16)
    name = b"token_embd.weight"
    pos = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    type_pos = pos + 4 + 8 * struct.unpack_from("<I", data, pos)[0]
    for type_id, message in [(99, "unknown quantization type id 99"), (16, "IQ2_XXS, which is not supported")]:
        struct.pack_into("<I", data, type_pos, type_id)
        path.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match=rf"q.gguf: tensor token_embd.weight .*{message}"):
            load_model(path)
    struct.pack_into("<I", data, type_pos, 0)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match="q.gguf: .*truncated"):
        load_model(path)


def test_unshardable_save(meta_dir, tmp_path):
    model, args = tiny_model()
    with pytest.raises(CheckpointError, match=r"x: tok_embeddings.weight dim 0 \(128\) is not divisible by 3 shards"):
        checkpoint.save_meta(model.state_dict(), args, tmp_path / "x", num_shards=3)
    with pytest.raises(CheckpointError, match=r"feed_forward.w1.weight dim 0 \(96\) is not divisible by 64 shards"):
        checkpoint.save_meta(model.state_dict(), args, tmp_path / "x", num_shards=64)


def test_flipped_bytes_are_refused_by_the_archive_checksums(meta_dir):
    """4 KB of flipped bytes inside a tensor load fine through torch's memory map (and would generate
    garbage); the zip archive's CRC-32 of that member catches them."""
    from llama.checkpoint import meta as meta_io
    file = meta_dir / "consolidated.00.pth"
    data = bytearray(file.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 4096] = bytes(b ^ 0xFF for b in data[mid : mid + 4096])
    file.write_bytes(bytes(data))
    torch.load(file, mmap=True, weights_only=True)  # torch alone does not notice
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: corrupt checkpoint.*checksums") as e:
        load_model(meta_dir)
    assert "\n" not in str(e.value)
    meta_io._VERIFIED.clear()
    with pytest.raises(CheckpointError, match="consolidated.00.pth: corrupt"):
        checkpoint.read_model_args(meta_dir)


def test_checksums_are_read_once_per_file(meta_dir, monkeypatch):
    from llama.checkpoint import meta as meta_io
    checked = []
    real = meta_io._check_member
    monkeypatch.setattr(meta_io, "_check_member", lambda *a: checked.append(a[1].filename) or real(*a))
    meta_io._VERIFIED.clear()
    load_model(meta_dir)
    first = len(checked)
    load_model(meta_dir)
    assert first > 0 and len(checked) == first


def test_dangling_tokenizer_link_names_the_flag(meta_dir, tmp_path):
    """Older checkpoints linked big tokenizers into a cache; a link whose target is gone says so, and
    names the command line's flag as well as the API's argument."""
    from llama.tokenizer import TokenizerError

    (meta_dir / "tokenizer.model").symlink_to(tmp_path / "gone.model")
    with pytest.raises(TokenizerError, match=r"link to .*gone\.model, which no longer exists.*--tokenizer-path"):
        checkpoint.default_tokenizer_path(meta_dir)


# ------------------------------------------------- issue 38: damaged files of every format, through the CLIs


def damage(data: bytes, kind: str) -> bytes:
    """empty, truncated (the first half), garbage (random bytes, same length), flipped (one byte)."""
    if kind == "empty":
        return b""
    if kind == "truncated":
        return data[: len(data) // 2]
    if kind == "garbage":
        return random.Random(len(data)).randbytes(max(len(data), 64))
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40  # inside the largest member: the tensors
    return bytes(flipped)


@pytest.fixture(scope="module")
def formats(corpus, smollm2_gguf, tmp_path_factory):
    """One checkpoint of each format, in its own temporary folder: Meta (the 640-token tiny one), HF
    (with an HF tokenizer.json, SmolLM2's), GGUF, a PEFT adapter, and a training run to resume."""
    from llama.tokenizer import save_tokenizer

    root = tmp_path_factory.mktemp("formats")
    meta = small_checkpoint(root / "ckpt", corpus[1])
    model = load_model(meta)
    hf = root / "hf"
    checkpoint.save_hf(model.state_dict(), model.params, hf)
    save_tokenizer(smollm2_gguf, hf)
    gguf = write_gguf(root / "formats.gguf", model.state_dict(), model.params)
    run = root / "run"
    proc = run_main(train_script.main, *TINY_TRAIN, f"data={corpus[0]}", f"out_dir={run}", "max_steps=1")
    assert proc.returncode == 0, proc.stderr
    return {"meta": meta, "hf": hf, "gguf": gguf, "adapter": make_adapter(meta, root / "adapter"), "run": run,
            "data": corpus[0]}


def damaged_copy(source: Path, name: str, kind: str, dst: Path) -> Path:
    """A copy of checkpoint folder (or file) `source` whose `name` is damaged; the rest linked."""
    if source.is_file():
        dst.write_bytes(damage(source.read_bytes(), kind))
        return dst
    step = source / source.joinpath("latest").read_text() if (source / "latest").is_file() else None
    folder = dst / step.name if step else dst
    folder.mkdir(parents=True)
    for f in (step or source).iterdir():
        (folder / f.name).symlink_to(f)
    (folder / name).unlink()
    (folder / name).write_bytes(damage(((step or source) / name).read_bytes(), kind))
    if step:
        (dst / "latest").write_text(step.name)
    return dst


FILES = [("meta", "consolidated.00.pth"), ("meta", "params.json"), ("meta", "tokenizer.model"),
         ("hf", "model.safetensors"), ("hf", "config.json"), ("hf", "tokenizer.json"), ("gguf", "formats.gguf"),
         ("adapter", "adapter_model.safetensors"), ("adapter", "adapter_config.json"),
         ("run", "consolidated.00.pth"), ("run", "train_state.00.pth")]
DAMAGE = [(fmt, name, kind) for fmt, name in FILES for kind in ("empty", "truncated", "garbage")
          + (("flipped",) if name.endswith(".pth") else ())]


@pytest.mark.parametrize("fmt,name,kind", DAMAGE, ids=[f"{f}-{n}-{k}" for f, n, k in DAMAGE])
def test_a_damaged_file_of_every_format_is_one_line(fmt, name, kind, formats, tmp_path):
    """The error path that formats "corrupt or truncated" (and its cousins) for empty, cut and garbage
    files of every format; for .pth also a flipped byte (the archive's checksums), resume included."""
    copy = damaged_copy(formats[fmt], name, kind, tmp_path / f"copy{formats[fmt].suffix}")
    if fmt == "run":  # resume verifies what it loads, as generate.py does
        proc = run_main(train_script.main, *TINY_TRAIN, f"data={formats['data']}", f"out_dir={copy}", "max_steps=2",
                        "resume=true")
    else:
        where = ["--ckpt-dir", formats["meta"], "--lora", copy] if fmt == "adapter" else ["--ckpt-dir", copy]
        if fmt == "gguf":
            where += ["--tokenizer-path", formats["meta"] / "tokenizer.model"]
        proc = run_main(generate_cli.main, *where, "--prompt", "Hi", "--max-gen-len", 1)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert name in errors[0] or (fmt == "gguf" and copy.name in errors[0]), errors[0]
