"""llama.plan --config: the training recipes in configs/train/scale/ planned by hand, and the numbers
their comments quote are the planner's."""

import re

import pytest

from llama import plan
from llama.model import ModelArgs
from llama.train.config import DEFAULT_MODEL, ConfigError, check_layout, load_config
from tests.helpers import ROOT

SCALE = ROOT / "configs/train/scale"
GiB = 1024**3


def per_rank_params(dim, layers, heads, kv_heads, ffn, vocab, mp):
    """Hand count of one model-parallel rank's parameters (untied; K/V heads split while mp <= K)."""
    head_dim = dim // heads
    matmuls = 2 * dim * dim + 2 * dim * kv_heads * head_dim + 3 * dim * ffn  # wq wo, wk wv, w1 w2 w3
    return layers * (matmuls // mp + 2 * dim) + 2 * vocab * dim // mp + dim  # + norms, embeddings/output


def activations_per_token(dim, heads, kv_heads, ffn, mp):
    """tests/test_plan.py's measured per-token bytes of one block, written out."""
    head_dim = dim // heads
    split = 2 * (heads * head_dim + 2 * kv_heads * head_dim) + 2 * heads * head_dim + 4 * heads + 8 * ffn
    return 2 * (8 * dim + 4) + split // mp


# name: (shape, mp, dp, tokens per forward); FSDP (ZeRO-3) shards all 16 bytes/param over dp
RECIPES = {
    "llama3.1-8b": ((4096, 32, 32, 8, 14336, 128256), 1, 8, 8192),
    "llama3.1-70b": ((8192, 80, 64, 8, 28672, 128256), 8, 4, 8192),
    "llama3.1-405b": ((16384, 126, 128, 8, 53248, 128256), 8, 32, 8192),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_memory_by_hand(name):
    (dim, layers, heads, kv, ffn, vocab), mp, dp, tokens = RECIPES[name]
    n = per_rank_params(dim, layers, heads, kv, ffn, vocab, mp)
    p = plan.plan_training_config(SCALE / f"{name}.toml", gpu="h100")
    assert (p.mp, p.dp, p.zero, p.seq * p.batch) == (mp, dp, 3, tokens)
    assert p.params["total_per_rank"] == n
    m = p.memory
    assert (m["weights"], m["gradients"], m["optimizer"]) == (2 * n // dp, 2 * n // dp, 12 * n // dp)
    assert m["loss head"] == (8 * vocab // mp + 8 * dim + 4) * tokens
    per_token = activations_per_token(dim, heads, kv, ffn, mp)
    assert m["activations (checkpointed)"] == (layers * 2 * dim + per_token) * tokens
    assert m["loss head (backward)"] == 4 * vocab // mp * tokens  # two more fp32 gradients of the logits' size
    total = 2 * n // dp * 2 + 12 * n // dp + m["loss head"] + m["loss head (backward)"] + m["activations (checkpointed)"]
    assert m["total (checkpointed)"] == total and p.fits
    # The recipe's comment quotes the planner: the same total in GiB.
    quoted = re.search(r"= ([\d.]+) GiB of 72 usable", (SCALE / f"{name}.toml").read_text()).group(1)
    assert f"{total / GiB:.2f}" == quoted


def test_recipes_are_train_configs_and_the_cli_plans_them(capsys):
    for path in SCALE.glob("*.toml"):  # every key known, every value valid (the weights aren't here)
        cfg = load_config(str(path), [f"init_from={ROOT}/tests", f"data={ROOT}/configs"])
        assert cfg.data_parallel == "fsdp" and cfg.activation_checkpointing
    assert plan.main(["--config", str(SCALE / "llama3.1-70b.toml")]) == 0
    out = capsys.readouterr().out
    assert "mp 8 x cp 1 x dp 4" in out and "ZeRO-3" in out and "46.08 GiB" in out
    assert plan.main([]) == 1 and "give --model" in capsys.readouterr().err  # one line, exit 1 like every CLI


def test_a_launch_that_does_not_match_the_recipe_is_refused():
    cfg = load_config(None, ["model_parallel_size=2", "data_parallel_size=4", "batch_size=8"])
    with pytest.raises(ConfigError, match="data_parallel_size=4 x model_parallel_size=2 needs 8 processes, "
                                          "torchrun started 4"):
        check_layout(cfg, ModelArgs(**DEFAULT_MODEL), 4)
    assert check_layout(cfg, ModelArgs(**DEFAULT_MODEL), 8)[0] == 4


def test_128k_recipe_is_torchtitans_layout_and_the_planner_is_within_10_percent_of_its_measurement():
    """configs/train/scale/llama3.1-8b-128k.toml: FSDP 2 x CP 4 at 131,072 tokens. ZeRO-3 shards over the
    8 data x context ranks, each rank's activations and loss head are a quarter sequence's, the gathered
    K/V count once. torchtitan's benchmark of this layout (8B, 8 H100s, FSDP 2 x CP 4, local batch 1, full
    activation checkpointing, no loss chunking; benchmarks/llama3_h100_202412_torchtitan.md) published
    84.0 GiB per GPU: the planner, asked for that run, is within 10% of it."""
    path = SCALE / "llama3.1-8b-128k.toml"
    p = plan.plan_training_config(path, gpu="h100")
    assert (p.mp, p.cp, p.dp, p.zero, p.seq, p.batch, p.loss_chunks) == (1, 4, 2, 3, 131072, 1, 8) and p.fits
    n = per_rank_params(4096, 32, 32, 8, 14336, 128256, 1)
    m, tokens = p.memory, 131072 // 4
    assert (m["weights"], m["gradients"], m["optimizer"]) == (2 * n // 8, 2 * n // 8, 12 * n // 8)
    assert m["loss head"] == (8 * 128256 // 8 + 8 * 4096 + 4) * tokens
    assert m["activations (checkpointed)"] == (32 * 2 * 4096 + activations_per_token(4096, 32, 8, 14336, 1)) * tokens
    assert m["context-parallel K/V"] == 2 * 131072 * 2 * (8 + 32) * 128 * 2  # K, V, their 32-head copies, gradients
    quoted = re.search(r"= ([\d.]+) GiB of 72 usable", path.read_text()).group(1)
    assert f"{p.total_bytes / GiB:.2f}" == quoted
    torchtitan = plan.make_plan(p.args, cp=4, dp=2, zero=3, seq=131072, train=True, gpu="h100")
    assert abs(torchtitan.total_bytes / GiB - 84.0) <= 0.1 * 84.0
