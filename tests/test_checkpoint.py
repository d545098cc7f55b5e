"""Loading real and synthetic checkpoints: SmolLM2's GGUF against HF transformers' own load of it,
exports reloaded, the GGUF reader against the `gguf` package's, config mapping, peak memory."""

import dataclasses
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import gguf
from gguf import GGMLQuantizationType as Q

from llama import checkpoint
from llama.checkpoint import detect_format, default_tokenizer_path, load_model, read_model_args
from llama.checkpoint.gguf import GGUFFile
from tests.helpers import TINY_ARGS, tiny_model, tokens, write_gguf

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "<|im_start|>user\nHi there!<|im_end|>\n",
           "1, 2, 3, 5, 8, 13,"]


@pytest.fixture(scope="module")
def smol(smollm2):
    """The session's SmolLM2 Transformer (conftest.py): the GGUF loaded once, fp32."""
    return smollm2.model


@pytest.fixture(scope="module")
def smol_batch(hf_smollm2_tokenizer):
    ids = [hf_smollm2_tokenizer(p)["input_ids"] for p in PROMPTS]
    return [torch.tensor([x]) for x in ids]


def test_smollm2_gguf_matches_transformers(smol, hf_smollm2, smol_batch):
    args = smol.params
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.head_dim) == (576, 30, 9, 3, 64)
    assert (args.ffn_hidden_dim, args.vocab_size, args.rope_theta) == (1536, 49152, 100000.0)
    assert args.tie_word_embeddings and smol.output.weight is smol.tok_embeddings.weight
    with torch.no_grad():
        for toks in smol_batch:
            ours, ref = smol(toks), hf_smollm2(toks).logits
            assert ref.abs().max() > 10  # real logits, not a degenerate model
            torch.testing.assert_close(ours, ref, atol=5e-4, rtol=0)


def test_smollm2_exports_reload_with_same_logits(smol, smol_batch, tmp_path):
    toks = smol_batch[0]
    with torch.no_grad():
        ref = smol(toks)
    sd = smol.state_dict()
    checkpoint.save_hf(sd, smol.params, tmp_path / "hf")
    checkpoint.save_meta(sd, smol.params, tmp_path / "meta", num_shards=3)
    for fmt in ("hf", "meta"):
        assert detect_format(tmp_path / fmt) == fmt
        back = load_model(tmp_path / fmt, max_seq_len=256)
        with torch.no_grad():
            assert torch.equal(back(toks), ref), fmt  # same fp32 weights, same code: bit-identical
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(toks).logits, ref, atol=5e-4, rtol=0)


def test_detection_args_and_tokenizer_paths(smollm2_gguf, tmp_path):
    assert detect_format(smollm2_gguf) == "gguf"
    assert default_tokenizer_path(smollm2_gguf) == smollm2_gguf
    assert read_model_args(smollm2_gguf, max_seq_len=77).max_seq_len == 77
    model, args = tiny_model()
    ckpt = tmp_path / "llama" / "8B"
    checkpoint.save_meta(model.state_dict(), args, ckpt)
    assert detect_format(ckpt) == "meta" and default_tokenizer_path(ckpt) is None
    (tmp_path / "llama" / "tokenizer.model").write_text("x")  # Meta's downloads: one dir up
    assert default_tokenizer_path(ckpt) == tmp_path / "llama" / "tokenizer.model"
    (ckpt / "tokenizer.model").write_text("x")
    assert default_tokenizer_path(ckpt) == ckpt / "tokenizer.model"
    checkpoint.save_hf(model.state_dict(), args, tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    assert default_tokenizer_path(tmp_path / "hf") == tmp_path / "hf" / "tokenizer.json"


def test_training_checkpoint_dir_with_extra_keys_and_files(tmp_path):
    """train.py's layout: params.json with our extra keys, consolidated.NN.pth, a train_state.pt."""
    model, args = tiny_model(hidden_dim=160, tie_word_embeddings=True, use_scaled_rope=True, rope_scaling_factor=32.0,
                             rope_original_max_seq_len=16)
    for rank in range(2):
        sd = {k: checkpoint_shard(k, v, rank) for k, v in model.state_dict().items()}
        torch.save(sd, tmp_path / f"consolidated.{rank:02d}.pth")
    params = {k: v for k, v in vars(args).items() if k not in ("max_seq_len", "max_batch_size")}
    (tmp_path / "params.json").write_text(json.dumps(params))
    torch.save({"step": 3, "optimizer": {"lr": 1.0}}, tmp_path / "train_state.pt")
    loaded = load_model(tmp_path, max_seq_len=64)
    assert loaded.params == dataclasses.replace(args, max_batch_size=1)
    with torch.no_grad():
        assert torch.equal(loaded(tokens(length=40)), model(tokens(length=40)))


def checkpoint_shard(name, full, rank):
    from llama import parallel

    return parallel.shard(name, full, rank, 2).clone()


@pytest.mark.parametrize("style", ["transformers4", "transformers5"])
def test_hf_config_mapping(style, tmp_path):
    rope = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    cfg = {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256, "rms_norm_eps": 1e-5,
           "head_dim": 64, "tie_word_embeddings": True}  # Llama 3.2 1B's config.json
    if style == "transformers4":
        cfg.update(rope_theta=500000.0, rope_scaling=rope)
    else:
        cfg.update(rope_parameters={**rope, "rope_theta": 500000.0})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes(b"")
    from llama.checkpoint.hf import config_to_params

    args = checkpoint.model_args_from_dict(config_to_params(cfg, tmp_path / "config.json"), tmp_path)
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.ffn_hidden_dim) == (2048, 16, 32, 8, 8192)
    assert args.use_scaled_rope and args.rope_scaling_factor == 32.0 and args.rope_theta == 500000.0
    assert args.tie_word_embeddings and args.head_dim == 64


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_tiny_gguf_loads_each_type(qtype, tmp_path):
    model, args = tiny_model()
    path = write_gguf(tmp_path / "tiny.gguf", model.state_dict(), args, qtype)
    loaded = load_model(path, max_seq_len=64, dtype=torch.float32)
    assert read_model_args(path) == read_model_args(path) and loaded.params.hidden_dim == args.hidden_dim
    with torch.no_grad():
        ours, ref = loaded(tokens()), model(tokens())
    # quantization error only: F32 exact; 4-bit types within a few percent of the logit range
    tol = {Q.F32: 0.0, Q.F16: 2e-3, Q.BF16: 2e-2, Q.Q8_0: 2e-2}.get(qtype, 0.25)
    assert (ours - ref).abs().max() <= tol * max(1.0, ref.abs().max())


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q2_K, Q.Q3_K, Q.Q8_0, Q.BF16])
def test_gguf_reader_matches_gguf_package(qtype, tmp_path):
    """Our header walk and dequantization agree with gguf.GGUFReader on every byte (random blocks:
    the gguf package cannot quantize K-types, but any bytes are valid input to dequantize)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    shape = (3, 2 * max(block, 32))  # (rows, elements per row)
    raw = rng.integers(0, 256, size=(shape[0], shape[1] // block * size), dtype=np.uint8)
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    w.add_string("general.name", "ünïcode ✓")
    w.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
    w.add_array("tokenizer.ggml.scores", [0.5, 1.5, -2.0])
    w.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=qtype)
    w.add_tensor("output_norm.weight", rng.standard_normal(7).astype(np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    ours, ref = GGUFFile(tmp_path / "q.gguf"), gguf.GGUFReader(tmp_path / "q.gguf")
    assert ours.metadata["general.name"] == "ünïcode ✓"
    assert ours.metadata["tokenizer.ggml.tokens"] == ["a", "bb", "ccc"]
    assert ours.metadata["tokenizer.ggml.scores"].tolist() == [0.5, 1.5, -2.0]
    for t in ref.tensors:
        expected = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        got = ours.tensor(t.name).float()
        assert tuple(got.shape) == tuple(reversed([int(d) for d in t.shape]))
        torch.testing.assert_close(got.reshape(expected.shape), expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.slow
def test_loading_peak_memory_is_near_the_weights_size():
    """bench/load_memory.py in miniature, the loads that copy (2 shards merged; HF bf16 -> fp32 with
    the q/k permutation): each in a fresh process, peak RSS over the weights."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "load_memory.py"), "--size-gb", "0.12", "--small",
                           "--json", "--no-peers", "--copies-only"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 2
    for name, r in results.items():
        assert r["weights"] > 0.1e9, name
        assert r["weights_read"] <= 1.5, (name, r)


def test_training_run_dir_follows_its_latest_pointer(tmp_path):
    """train.py's out_dir holds step_NNNNNN/ checkpoints and a `latest` file naming the newest."""
    model, args = tiny_model()
    checkpoint.save_meta(model.state_dict(), args, tmp_path / "step_000002")
    (tmp_path / "step_000001").mkdir()  # an older, incomplete one must not be picked
    (tmp_path / "latest").write_text("step_000002\n")
    assert detect_format(tmp_path) == "meta"
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path)(tokens()), model(tokens()), atol=0, rtol=0)
    (tmp_path / "latest").write_text("step_000001\n")
    with pytest.raises(checkpoint.CheckpointError, match="step_000001"):
        load_model(tmp_path)
