"""Fairscale model parallelism with real gloo processes: logits and every parameter's gradient,
gathered to full shape, equal the single-process model with the same weights."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llama import parallel
from llama.model import ModelArgs, Transformer
from tests.helpers import run_distributed

ARGS = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=256, multiple_of=32, max_seq_len=64,
            rope_theta=10000.0)


def make_inputs():
    g = torch.Generator().manual_seed(123)
    tokens = torch.randint(0, 256, (2, 24), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def forward_backward(model):
    inputs, targets = make_inputs()
    logits = model(inputs)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    return logits.detach()


def mp_worker(mp: int, overrides: dict):
    parallel.init_distributed(mp)
    model = Transformer(ModelArgs(**{**ARGS, **overrides}))
    model.init_weights(seed=7)
    logits = forward_backward(model)
    grads = {n: parallel.gather(n, p.grad) for n, p in model.named_parameters()}
    weights = {n: parallel.gather(n, p.detach()) for n, p in model.named_parameters()}
    # a cached decode under model parallel equals the full forward too
    inputs, _ = make_inputs()
    cache = model.make_cache(2, inputs.shape[1])
    with torch.no_grad():
        steps = [model(inputs[:, :10], 0, cache)] + [model(inputs[:, i : i + 1], i, cache) for i in range(10, inputs.shape[1])]
    return {"logits": logits, "grads": grads, "weights": weights, "decoded": torch.cat(steps, 1)}


def single_process(overrides: dict):
    model = Transformer(ModelArgs(**{**ARGS, **overrides}))
    model.init_weights(seed=7)
    logits = forward_backward(model)
    return model, logits


@pytest.mark.slow
@pytest.mark.parametrize("mp", [2, 4])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_model_parallel_matches_single_process(mp, tied):
    overrides = {"tie_word_embeddings": tied}
    model, logits = single_process(overrides)
    results = run_distributed(mp_worker, mp, mp, overrides)
    for rank, res in enumerate(results):
        # same seed, any layout: the same logical weights
        for name, p in model.named_parameters():
            torch.testing.assert_close(res["weights"][name], p.detach(), atol=0, rtol=0)
        torch.testing.assert_close(res["logits"], logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res["decoded"], logits, atol=1e-5, rtol=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(res["grads"][name], p.grad, atol=1e-5, rtol=1e-5, msg=f"grad {name} rank {rank}")


def duplicated_kv_worker(full_state: dict):
    """MP=4 with 2 K/V heads: each rank holds a copy of the K/V head its queries use (as Meta's 405B
    MP16 release does). The duplication is written here independently of llama/checkpoint/load.py."""
    parallel.init_distributed(4)
    args = ModelArgs(**{**ARGS, "n_kv_heads": 2})
    with torch.device("meta"):
        model = Transformer(args)
    local = {}
    for name, full in full_state.items():
        if name.endswith(("attention.wk.weight", "attention.wv.weight")):
            heads = full.view(args.n_kv_heads, args.head_dim, args.dim)
            full = heads.repeat_interleave(4 // args.n_kv_heads, dim=0).reshape(-1, args.dim)
        local[name] = parallel.shard(name, full)
    model.load_state_dict(local, strict=True, assign=True)
    model.to("cpu")
    with torch.no_grad():
        return model(make_inputs()[0])


@pytest.mark.slow
def test_more_ranks_than_kv_heads_duplicates_heads():
    model, logits = single_process({"n_kv_heads": 2})
    full_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for res in run_distributed(duplicated_kv_worker, 4, full_state):
        torch.testing.assert_close(res, logits, atol=1e-5, rtol=1e-5)


def errors_worker():
    parallel.init_distributed(2)
    messages = []
    for bad in (dict(n_heads=3, n_kv_heads=3, dim=48), dict(vocab_size=255), dict(hidden_dim=97)):
        try:
            Transformer(ModelArgs(**{**ARGS, **bad}))
            messages.append(None)
        except ValueError as e:
            messages.append(str(e))
    return messages


@pytest.mark.slow
def test_indivisible_shapes_are_refused_with_a_clear_message():
    messages = run_distributed(errors_worker, 2)[0]
    assert "n_heads=3" in messages[0] and "model-parallel size 2" in messages[0]
    assert "vocab_size=255" in messages[1]
    assert messages[2] is not None and "97" in messages[2]


def test_single_process_without_torchrun_refuses_model_parallel(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert parallel.init_distributed(None) == 1
    with pytest.raises(ValueError, match="torchrun --nproc_per_node 2"):
        parallel.init_distributed(2)


def test_shard_table_covers_every_parameter():
    model = Transformer(ModelArgs(**ARGS))
    for name, p in model.named_parameters():
        dim = parallel.shard_dim(name)
        assert dim in (0, 1, None)
        assert (dim is None) == (p.dim() == 1)
    with pytest.raises(KeyError):
        parallel.shard_dim("layers.0.attention.wz.weight")


def test_shard_and_full_shape_are_inverse():
    full = torch.arange(8 * 6.0).view(8, 6)
    pieces = [parallel.shard("layers.0.attention.wo.weight", full, rank=r, size=3) for r in range(3)]
    assert all(p.shape == (8, 2) for p in pieces)
    assert parallel.full_shape("layers.0.attention.wo.weight", pieces[0].shape, size=3) == full.shape
    torch.testing.assert_close(torch.cat(pieces, 1), full)


EXIT_WORKER = """
import atexit
import torch.distributed as dist
from llama import parallel

# atexit runs handlers last-registered-first: this one runs after init_distributed's own.
atexit.register(lambda: print(f"rank {dist.get_rank() if dist.is_initialized() else '?'}: "
                              f"group alive at exit: {dist.is_initialized()}", flush=True))
parallel.init_distributed()
print(f"rank {dist.get_rank()}: joined", flush=True)
"""


def test_script_that_just_returns_leaves_the_process_group_cleanly(tmp_path):
    """Leaving the gloo group to interpreter teardown aborted a rank now and then ("terminate called
    without an active exception"); init_distributed destroys the group at exit instead."""
    script = tmp_path / "worker.py"
    script.write_text(EXIT_WORKER)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    # two processes share the pipe, so lines may interleave: count the messages instead
    assert proc.stdout.count(": joined") == 2 and "rank 1: joined" in proc.stdout, proc.stdout
    assert proc.stdout.count("group alive at exit: False") == 2, proc.stdout
    assert "group alive at exit: True" not in proc.stdout


# ---------------------------------------------------------------------------- the K/V-head rule, in one place


def init_worker(overrides: dict):
    parallel.init_distributed(int(os.environ["WORLD_SIZE"]))
    model = Transformer(ModelArgs(**{**ARGS, **overrides}))
    model.init_weights(seed=7)
    return {n: parallel.gather(n, p.detach()) for n, p in model.named_parameters()}


@pytest.mark.slow
def test_init_weights_is_layout_invariant_with_duplicated_kv_heads():
    # mp=4 > 2 K/V heads: ranks 0,1 share head 0 and ranks 2,3 head 1. Each pair must hold the same
    # draw, the one a single process makes, expanded by the K/V-head rule (before the fix each rank
    # drew its own "head" from a 4-head tensor).
    model, _ = single_process({"n_kv_heads": 2})
    gathered = run_distributed(init_worker, 4, {"n_kv_heads": 2})[0]
    for name, p in model.named_parameters():
        expected = parallel.repeat_kv_heads(p.detach(), 2, 4) if name.endswith(("wk.weight", "wv.weight")) else p
        torch.testing.assert_close(gathered[name], expected.detach(), atol=0, rtol=0, msg=name)


GRID = [(n_heads, n_kv, mp) for n_heads in (4, 6, 8) for n_kv in (1, 2, 3, 4, 8) for mp in (1, 2, 3, 4, 6, 8)
        if n_heads % n_kv == 0]


@pytest.mark.parametrize("n_heads, n_kv, mp", GRID)
def test_callers_of_the_kv_head_rule_agree(n_heads, n_kv, mp, monkeypatch):
    """model.py (building the layers), plan.py, train_config.py and save_meta's shard check give one
    answer for each (n_heads, n_kv_heads, mp): the rule is llama.parallel.check_model_parallel."""
    from llama import plan
    from llama.checkpoint import meta as meta_io
    from llama.common.errors import UserError
    from llama.train.config import TrainConfig, check_layout

    args = ModelArgs(dim=16 * n_heads, n_layers=1, n_heads=n_heads, n_kv_heads=n_kv, vocab_size=48 * 8,
                     hidden_dim=48 * 8)

    def ok(fn):
        try:
            fn()
            return True
        except UserError:
            return False

    monkeypatch.setattr(parallel, "model_parallel_size", lambda: mp)
    monkeypatch.setattr(parallel, "model_parallel_rank", lambda: 0)
    with torch.device("meta"):
        model_ok = ok(lambda: Transformer(args))
    plan_ok = ok(lambda: plan.check_model_parallel(args, mp))
    train_ok = ok(lambda: check_layout(TrainConfig(model_parallel_size=mp, batch_size=mp, micro_batch_size=1), args, mp))
    assert model_ok == plan_ok
    assert train_ok == (model_ok and mp <= n_kv)  # training alone refuses duplicated heads
    state = {"layers.0.attention.wq.weight": torch.zeros(n_heads * args.head_dim, args.dim),
             "layers.0.attention.wk.weight": torch.zeros(n_kv * args.head_dim, args.dim)}
    assert ok(lambda: meta_io._check_shardable(state, args, mp, "out")) == model_ok  # saving at mp shards
    if model_ok:
        kv = parallel.kv_heads_for(n_kv, mp)
        with torch.device("meta"):
            attn = Transformer(args).layers[0].attention
        assert attn.n_kv_heads == kv and attn.wk.weight.shape[0] == kv * args.head_dim // mp
        assert plan.kv_cache_bytes(args, 1, 1, mp) == 2 * kv // mp * args.head_dim * plan.KV_BYTES
        piece = meta_io.kv_shard(state["layers.0.attention.wk.weight"], n_kv, 0, mp)
        assert piece.shape[0] == kv * args.head_dim // mp
