"""One home per rule (issue 34): each rule below is one function or constant, and its callers agree.
(The K/V-head divisibility rule's callers: tests/test_parallel.py test_callers_of_the_kv_head_rule_agree.)"""

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from llama import lora, parallel
from llama.model import ModelArgs
from tests.helpers import ROOT, tiny_model, tokens

SOURCES = {p.relative_to(ROOT).as_posix(): p.read_text() for p in (ROOT / "llama").rglob("*.py")}


def spelled_in(pattern: str) -> list:
    return sorted(path for path, text in SOURCES.items() if re.search(pattern, text))


# ---------------------------------------------------------------------------- one forward, one head


def test_the_loss_the_chunked_loss_and_the_scorer_read_the_one_head():
    """Transformer.forward's logits, training's loss (whole and in chunks), DPO's reply log-probabilities
    and the evaluation scorer all come from Transformer.logits on the forward's final residual stream."""
    from llama.eval.scoring import score_requests
    from llama.train.dpo import response_logps
    from llama.train.loop import loss_sum

    model, _ = tiny_model()
    x, y = tokens(2, 17)[:, :-1], tokens(2, 17)[:, 1:].clone()
    y[0, :4] = -100
    logits = model(x)
    assert torch.equal(logits, model(x, head=lambda m, h: m.logits(h)))
    want = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
    per_row = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="none").view(y.shape)
    for chunks in (1, 2, 5):
        torch.testing.assert_close(loss_sum(model, x, y, chunks), want, atol=1e-5, rtol=1e-6)
        logps, counts = response_logps(model, x, y, chunks)
        torch.testing.assert_close(logps, -per_row.sum(1), atol=1e-5, rtol=1e-6)
        assert counts.tolist() == [12, 16]
    seq = tokens(1, 17)[0].tolist()
    (logprobs, greedy), = score_requests(model, [(seq, 6)])
    full = torch.log_softmax(model(torch.tensor([seq[:-1]]))[0], -1)  # (16, V)
    torch.testing.assert_close(logprobs, full[-6:].gather(1, torch.tensor(seq[-6:])[:, None])[:, 0])
    assert greedy == bool((full[-6:].argmax(-1) == torch.tensor(seq[-6:])).all())
    assert spelled_in(r"output\((self|model)\.norm\(") == ["llama/model.py"]  # norm + output: one place


# ---------------------------------------------------------------------------- K/V-head duplication


@pytest.mark.parametrize("n_kv, mp", [(1, 2), (2, 1), (2, 2), (2, 4), (2, 8), (4, 2), (3, 6), (8, 16)])
def test_callers_of_the_kv_duplication_rule_agree(n_kv, mp):
    """Rank r's wk/wv heads are parallel.local_kv_heads(n_kv, mp, r) for every caller: shard (weight
    init, save_meta's release shards), repeat_kv_heads, the checkpoint loader cutting from a release
    saved at any shard count (duplicated heads or not), and LoRA B merging (checkpoint/peft)."""
    from llama.checkpoint import load as load_io
    from llama.checkpoint import meta as meta_io

    hd, dim, r = 4, 8, 3
    args = ModelArgs(dim=dim, n_layers=1, n_heads=n_kv * mp, n_kv_heads=n_kv, head_dim=hd, vocab_size=16,
                     hidden_dim=8)
    full = torch.randn(n_kv * hd, dim)
    b = torch.randn(n_kv * hd, r)
    repeated = parallel.repeat_kv_heads(full, n_kv, mp)
    source = SimpleNamespace(path="ckpt", args_file="params.json")
    for rank in range(mp):
        heads = parallel.local_kv_heads(n_kv, mp, rank)
        want = full.view(n_kv, hd, dim)[heads].reshape(-1, dim)
        assert len(heads) == parallel.kv_heads_for(n_kv, mp) // mp
        assert torch.equal(parallel.shard("layers.0.attention.wk.weight", full, rank, mp, n_kv_heads=n_kv), want)
        assert torch.equal(repeated.chunk(mp)[rank], want)
        for saved in {1, n_kv, mp}:  # a release of 1, n_kv or mp shards (past n_kv: heads duplicated)
            pieces = [meta_io.kv_shard(full, n_kv, i, saved) for i in range(saved)]
            assert torch.equal(load_io._kv_rows(source, "layers.0.attention.wv.weight", pieces, args, rank, mp), want)
        got_b = parallel.shard("layers.0.attention.wk.lora_B.weight", b, rank, mp, n_kv_heads=n_kv)
        assert torch.equal(got_b, b.view(n_kv, hd, r)[heads].reshape(-1, r))
    assert spelled_in(r"// copies|j // ") == ["llama/parallel/layout.py"]


def test_training_refuses_model_parallel_above_n_kv_heads_in_one_place():
    """train.py's layout check and LoRA's adapter check refuse the same layouts: the one rule is
    parallel.kv_heads_duplicated."""
    from llama.train.config import ConfigError, TrainConfig, check_layout

    args = ModelArgs(dim=64, n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=64, hidden_dim=64)
    for mp in (1, 2, 4, 8):
        try:
            check_layout(TrainConfig(model_parallel_size=mp, batch_size=mp, micro_batch_size=1), args, mp)
            train_ok = True
        except ConfigError as e:
            train_ok = False
            assert f"exceeds n_kv_heads=2: training needs each K/V head on one rank" in str(e)
        try:
            lora.check_model(args, 4, ["wq", "wk"], mp)
            lora_ok = True
        except lora.LoRAError as e:
            lora_ok = False
            assert f"model_parallel_size={mp} > n_kv_heads=2" in str(e)
        assert train_ok == lora_ok == (mp <= 2), mp
    lora.check_model(args, 4, ["wq", "wo"], 8)  # no K/V adapters: nothing duplicated trains
    assert spelled_in(r"\bif\b[^\n]*\bmp > (args\.)?n_kv") == []  # every caller asks kv_heads_duplicated


# ---------------------------------------------------------------------------- dtypes, ranks, thresholds


def test_the_autocast_and_base_dtypes_come_from_one_rule():
    """auto is bf16 on CUDA and fp32 on the CPU for the autocast dtype (train/setup, which FSDP's
    mixed precision and LoRA's check read) and for LoRA's frozen base."""
    from llama.common.dtypes import training_dtype
    from llama.train.adapters import attach
    from llama.train.config import TrainConfig
    from llama.train.setup import compute_dtype

    for device, auto in [(torch.device("cpu"), torch.float32), (torch.device("cuda", 0), torch.bfloat16)]:
        for name in ("auto", "float32", "bfloat16"):
            want = auto if name == "auto" else getattr(torch, name)
            assert training_dtype(name, device) == want
            assert compute_dtype(TrainConfig(dtype=name), device) == want
            assert lora.base_dtype_for(name, device) == want
    cpu = torch.device("cpu")
    model, _ = tiny_model()
    with pytest.raises(lora.LoRAError, match="base_dtype=bfloat16 needs autocast in the same dtype"):
        attach(TrainConfig(lora_rank=2, base_dtype="bfloat16"), model, cpu)  # autocast auto: fp32 here
    attach(TrainConfig(lora_rank=2, base_dtype="bfloat16", dtype="bfloat16"), tiny_model()[0], cpu)
    assert spelled_in(r'"bfloat16" if .*cuda|torch\.bfloat16 if .*cuda') == ["llama/common/dtypes.py"]


def test_first_rank_and_checkpoint_writer_have_one_spelling(monkeypatch):
    """Who prints and writes once: parallel.is_first_rank; who writes model-parallel rank r's files:
    data-parallel rank r mod D (parallel.is_checkpoint_writer), exactly one per model-parallel rank."""
    assert spelled_in(r"get_rank\(\) == 0") == ["llama/parallel/__init__.py"]
    assert spelled_in(r"data_parallel_rank\(\) == ") == ["llama/parallel/__init__.py"]
    for mp, dp in [(1, 1), (2, 1), (1, 4), (8, 4), (8, 32)]:
        writers = {}
        for m in range(mp):
            for d in range(dp):
                monkeypatch.setattr(parallel, "model_parallel_rank", lambda m=m: m)
                monkeypatch.setattr(parallel, "data_parallel_rank", lambda d=d: d)
                monkeypatch.setattr(parallel, "data_parallel_size", lambda dp=dp: dp)
                if parallel.is_checkpoint_writer():
                    writers.setdefault(m, []).append(d)
        assert writers == {m: [m % dp] for m in range(mp)}
    assert parallel.is_first_rank()  # no process group: the only process


def test_the_prefill_threshold_is_one_constant(monkeypatch):
    """Every quantized product switches to a GEMM on dequantized weights above PREFILL_ROWS rows."""
    from llama.generation import quantize

    layer = quantize.Int8Linear(torch.randn(24, 32))
    calls = []
    kernel = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(a[0].shape[0]) or kernel(*a))
    for rows in (1, quantize.PREFILL_ROWS, quantize.PREFILL_ROWS + 1, 4 * quantize.PREFILL_ROWS):
        layer(torch.randn(rows, 32))
    assert calls == [1, quantize.PREFILL_ROWS]
    text = SOURCES["llama/generation/quantize.py"]
    assert re.findall(r"shape\[0\] > (\w+)", text) == ["PREFILL_ROWS", "PREFILL_ROWS"]
