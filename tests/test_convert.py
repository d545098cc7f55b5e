"""Resharding and conversion: Meta checkpoints with 1, 2, 4 shards (and Llama 2's layout, HF and GGUF)
load at model-parallel sizes 1, 2, 4 in real gloo processes with the single-process logits;
Meta -> HF -> Meta is bit-exact; the convert command works and fails cleanly."""

import json
import subprocess
import sys
import warnings

import pytest
import torch

from llama import checkpoint, parallel
from llama.checkpoint import CheckpointError, load_model
from llama.convert import main as convert_main
from tests.helpers import tiny_model, tokens, write_gguf
from tests.helpers import run_distributed

SHARDS = [1, 2, 4]


def write_llama2_layout(model, args, out, n):
    """Llama 2's release: tok_embeddings split along dim 1, vocab_size -1, no rope_theta key."""
    out.mkdir()
    for rank in range(n):
        sd = {}
        for name, full in model.state_dict().items():
            dim = 1 if name == "tok_embeddings.weight" else parallel.shard_dim(name)
            sd[name] = full if dim is None else full.chunk(n, dim)[rank].clone()
        sd["rope.freqs"] = torch.ones(args.head_dim // 2)  # Llama 2 files carry this unused buffer
        torch.save(sd, out / f"consolidated.{rank:02d}.pth")
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
              "multiple_of": 32, "norm_eps": args.norm_eps, "vocab_size": -1, "hidden_dim": args.hidden_dim}
    (out / "params.json").write_text(json.dumps(params))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One tiny model (GQA, 2 K/V heads) in every layout, and its single-process logits."""
    root = tmp_path_factory.mktemp("ckpts")
    model, args = tiny_model()
    dirs = {}
    for n in SHARDS:  # 4 shards > 2 K/V heads: each head stored twice, like Meta's 405B MP16
        dirs[f"meta{n}"] = root / f"meta{n}"
        checkpoint.save_meta(model.state_dict(), args, dirs[f"meta{n}"], num_shards=n)
    dirs["llama2"] = root / "llama2"
    write_llama2_layout(model, args, dirs["llama2"], 2)
    dirs["hf"] = root / "hf"
    checkpoint.save_hf(model.state_dict(), args, dirs["hf"], max_shard_bytes=60_000)  # several files + index
    dirs["gguf"] = write_gguf(root / "tiny.gguf", model.state_dict(), args)
    bad, bad_args = tiny_model(n_heads=6, n_kv_heads=2, dim=96)  # 6 heads cannot split over 4 ranks
    dirs["bad"] = root / "bad"
    checkpoint.save_meta(bad.state_dict(), bad_args, dirs["bad"])
    with torch.no_grad():
        ref = model(tokens())
    return {k: str(v) for k, v in dirs.items()}, ref


def load_all(dirs: dict, mp: int):
    """Each checkpoint's logits at this model-parallel size (runs in every rank)."""
    parallel.init_distributed(mp)
    out = {}
    for name, path in dirs.items():
        try:
            model = load_model(path, max_seq_len=64)
        except CheckpointError as e:
            out[name] = str(e)
            continue
        if mp > 1:  # this rank really holds a shard
            assert model.layers[0].attention.wq.weight.shape[0] == model.params.dim // mp
        with torch.no_grad():
            out[name] = model(tokens())
    return out


def check(results: dict, ref, mp: int):
    for name, logits in results.items():
        if name == "bad":
            assert isinstance(logits, str) if mp == 4 else torch.is_tensor(logits)
            continue
        assert torch.is_tensor(logits), f"{name} at mp={mp}: {logits}"
        # same weights; only the order of the model-parallel sums differs from one process
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0, msg=f"{name} at mp={mp}")
    meta = [results[f"meta{n}"] for n in SHARDS]
    assert all(torch.equal(m, meta[0]) for m in meta), "N -> M resharding gave different weights"


def test_every_layout_at_model_parallel_1(checkpoints):
    dirs, ref = checkpoints
    results = load_all(dirs, 1)
    check(results, ref, 1)
    for name in ("meta1", "hf", "llama2"):
        assert torch.equal(results[name], ref)  # one process, same weights: bit-identical


@pytest.mark.slow
@pytest.mark.parametrize("mp", [2, 4])
def test_every_layout_at_model_parallel_n(checkpoints, mp):
    dirs, ref = checkpoints
    ranks = run_distributed(load_all, mp, dirs, mp)
    for rank, results in enumerate(ranks):
        check(results, ref, mp)
        if mp == 4:
            assert "n_heads=6 is not divisible by the model-parallel size 4" in results["bad"]
            assert dirs["bad"] in results["bad"]


@pytest.mark.parametrize("tied", [False, True])
def test_meta_hf_meta_is_bit_exact_and_hf_matches_transformers(tied, tmp_path):
    model, args = tiny_model(tie_word_embeddings=tied, use_scaled_rope=True, rope_scaling_factor=32.0,
                             rope_original_max_seq_len=16)
    checkpoint.save_meta(model.state_dict(), args, tmp_path / "meta", dtype=torch.bfloat16)
    assert convert_main([str(tmp_path / "meta"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert convert_main([str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "meta", "--shards", "2"]) == 0
    assert convert_main([str(tmp_path / "back"), str(tmp_path / "back1"), "--to", "meta"]) == 0
    first = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    last = torch.load(tmp_path / "back1" / "consolidated.00.pth", weights_only=True)
    assert first.keys() == last.keys() and all(torch.equal(first[k], last[k]) for k in first)
    assert (tmp_path / "meta" / "params.json").read_text() == (tmp_path / "back1" / "params.json").read_text()
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours = load_model(tmp_path / "hf", max_seq_len=64, dtype=torch.float32).eval()
    toks = tokens(length=40)  # past rope_original_max_seq_len=16: the 3.1 scaling matters
    with torch.no_grad():
        torch.testing.assert_close(hf(toks).logits, ours(toks), atol=1e-5, rtol=0)


def test_convert_cli_fails_cleanly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llama.convert", str(tmp_path / "nope"), str(tmp_path / "out"),
                           "--to", "hf"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "nope: no such file or directory" in proc.stderr
    model, args = tiny_model()
    checkpoint.save_meta(model.state_dict(), args, tmp_path / "m")
    assert convert_main([str(tmp_path / "m"), str(tmp_path / "m3"), "--to", "meta", "--shards", "3"]) == 1


def test_training_checkpoint_params_json_equals_converts(tmp_path):
    """One params.json writer: a training checkpoint and convert write the same file for the same
    ModelArgs, and it reads back into equal ModelArgs."""
    from llama.model import ModelArgs
    from llama.train.state import save_checkpoint

    for extra in [{}, dict(tie_word_embeddings=True, use_scaled_rope=True, rope_scaling_factor=32.0,
                           rope_original_max_seq_len=16, context_length=8192, head_dim=32)]:
        model, args = tiny_model(**extra)
        out = tmp_path / str(len(extra))
        save_checkpoint(out / "run", 1, model, {"step": 1}, None)
        checkpoint.save_meta(model.state_dict(), args, out / "meta")
        text = (out / "run/step_000001/params.json").read_text()
        assert text == (out / "meta/params.json").read_text()
        back = ModelArgs(**json.loads(text), max_seq_len=args.max_seq_len, max_batch_size=args.max_batch_size)
        assert back == args
        assert checkpoint.read_model_args(out / "run/step_000001", max_seq_len=args.max_seq_len,
                                          max_batch_size=args.max_batch_size) == args


CONFIG_FIELDS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "max_position_embeddings",
                 "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters"]


@pytest.mark.parametrize("scaled", [False, True])
def test_round_trips_keep_the_hf_config(scaled, tmp_path):
    """HF -> HF and HF -> Meta -> HF keep every config field the model uses; the 8192-position context
    is not replaced by load_model's default max_seq_len (2048)."""
    rope = dict(use_scaled_rope=True, rope_scaling_factor=32.0, rope_original_max_seq_len=16) if scaled else {}
    model, args = tiny_model(tie_word_embeddings=True, head_dim=32, norm_eps=1e-6, rope_theta=123456.0, **rope)
    checkpoint.save_hf(model.state_dict(), args, tmp_path / "hf0")
    config = json.loads((tmp_path / "hf0/config.json").read_text())
    config["max_position_embeddings"] = 8192
    (tmp_path / "hf0/config.json").write_text(json.dumps(config))
    assert convert_main([str(tmp_path / "hf0"), str(tmp_path / "hf1"), "--to", "hf"]) == 0
    assert convert_main([str(tmp_path / "hf0"), str(tmp_path / "meta"), "--to", "meta"]) == 0
    assert json.loads((tmp_path / "meta/params.json").read_text())["context_length"] == 8192
    assert convert_main([str(tmp_path / "meta"), str(tmp_path / "hf2"), "--to", "hf"]) == 0
    for out in ("hf1", "hf2"):
        got = json.loads((tmp_path / out / "config.json").read_text())
        assert {k: got.get(k) for k in CONFIG_FIELDS} == {k: config.get(k) for k in CONFIG_FIELDS}, out
    assert checkpoint.read_model_args(tmp_path / "hf2").context_length == 8192
