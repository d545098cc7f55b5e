"""The planner against numbers worked out by hand from the published shapes, and its activation
formula against what autograd really saves for a block of llama/model.py."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llama import lora, plan
from llama.model import ModelArgs, Transformer, TransformerBlock, precompute_freqs_cis

GiB = 2**30
CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "models"


def args_of(name):
    return plan.load_model_args(f"{CONFIGS}/{name}.json")


def hand_count(dim, layers, heads, kv_heads, ffn, vocab, tied=False):
    """Parameters of a Llama from its shape: embeddings, per-layer q/k/v/o, SwiGLU, two norms."""
    head_dim = dim // heads
    attention = dim * heads * head_dim * 2 + dim * kv_heads * head_dim * 2
    per_layer = attention + 3 * dim * ffn + 2 * dim
    return vocab * dim * (1 if tied else 2) + layers * per_layer + dim


@pytest.mark.parametrize("name, shape, published", [
    ("llama3.1-8b", (4096, 32, 32, 8, 14336, 128256), 8_030_261_248),
    ("llama3.1-70b", (8192, 80, 64, 8, 28672, 128256), 70_553_706_496),
    ("llama3.1-405b", (16384, 126, 128, 8, 53248, 128256), 405_853_388_800),
])
def test_parameter_counts_match_the_published_models(name, shape, published):
    counts = plan.parameter_counts(args_of(name))
    assert counts["total"] == hand_count(*shape) == published
    assert counts["matmul"] == published - 128256 * shape[0]  # the input embedding is a lookup


def test_tied_embeddings_count_once():
    counts = plan.parameter_counts(args_of("llama3.2-1b"))
    assert counts["total"] == hand_count(2048, 16, 32, 8, 8192, 128256, tied=True) == 1_235_814_400
    assert counts["matmul"] == counts["total"]  # the shared table is used as the output layer


def test_weights_of_8b_in_bf16():
    p = plan.make_plan(args_of("llama3.1-8b"), seq=8192)
    assert p.memory["weights"] == 8_030_261_248 * 2


def test_kv_cache_of_8b_at_128k_is_16_gib():
    args = args_of("llama3.1-8b")
    assert 2 * 32 * 8 * 128 * 131072 * 2 == 16 * GiB
    assert plan.kv_cache_bytes(args, batch=1, seq=131072) == 16 * GiB
    assert plan.make_plan(args, seq=131072).memory["KV cache"] == 16 * GiB
    assert plan.kv_cache_bytes(args, batch=3, seq=131072) == 48 * GiB


@pytest.mark.parametrize("mp, kv_gib", [(1, 16), (2, 8), (4, 4), (8, 2), (16, 2), (32, 2)])
def test_kv_cache_splits_by_mp_until_heads_are_duplicated(mp, kv_gib):
    # 8 K/V heads: up to mp=8 each rank holds 8/mp heads; past that, one (duplicated) head each.
    assert plan.kv_cache_bytes(args_of("llama3.1-8b"), 1, 131072, mp) == kv_gib * GiB


@pytest.mark.parametrize("mp", [1, 2, 4, 8])
def test_weights_divide_by_mp_except_the_norms(mp):
    args = args_of("llama3.1-8b")
    norms = (2 * 32 + 1) * 4096  # replicated on every rank
    per_rank = (8_030_261_248 - norms) // mp + norms
    assert plan.parameter_counts(args, mp)["total_per_rank"] == per_rank
    assert plan.make_plan(args, mp=mp).memory["weights"] == 2 * per_rank


def test_405b_mp16_stores_one_kv_head_per_rank():
    # Meta's 405B MP16 release: 8 K/V heads stored as 16, so each rank's wk/wv is a full head.
    counts = plan.parameter_counts(args_of("llama3.1-405b"), 16)
    norms = (2 * 126 + 1) * 16384
    wk_wv = 126 * 2 * 8 * 128 * 16384
    expected = (405_853_388_800 - norms - wk_wv) // 16 + norms + 126 * 2 * 128 * 16384
    assert counts["total_per_rank"] == expected
    assert plan.kv_cache_bytes(args_of("llama3.1-405b"), 1, 131072, 16) == 2 * 126 * 131072 * 128 * 2


def test_training_states_are_16_bytes_per_parameter_and_zero_shards_them():
    args = args_of("llama3.1-8b")
    n = 8_030_261_248
    ddp = plan.make_plan(args, dp=4, seq=4096, train=True).memory
    assert (ddp["weights"], ddp["gradients"], ddp["optimizer"]) == (2 * n, 2 * n, 12 * n)
    z1 = plan.make_plan(args, dp=4, seq=4096, train=True, zero=1).memory
    assert (z1["weights"], z1["gradients"], z1["optimizer"]) == (2 * n, 2 * n, 3 * n)
    z3 = plan.make_plan(args, dp=4, seq=4096, train=True, zero=3).memory
    assert (z3["weights"], z3["gradients"], z3["optimizer"]) == (n // 2, n // 2, 3 * n)


def test_activations_of_8b_by_hand():
    args = args_of("llama3.1-8b")
    # mp=8: norms 2*(8*4096+4) replicated; q,k,v (32+8+8 heads*128), wo input, lse, 4 FFN tensors split
    split = 2 * (32 * 128 + 2 * 8 * 128) + 2 * 32 * 128 + 4 * 32 + 8 * 14336
    assert plan.activation_bytes_per_token(args, 8) == 2 * (8 * 4096 + 4) + split // 8 == 82456
    p = plan.make_plan(args, mp=8, seq=8192, batch=2, train=True).memory
    assert p["activations"] == 32 * 82456 * 2 * 8192
    assert p["activations (checkpointed)"] == (32 * 2 * 4096 + 82456) * 2 * 8192
    assert p["loss head"] == (8 * 128256 // 8 + 8 * 4096 + 4) * 2 * 8192  # vocabulary-parallel loss
    cp = plan.make_plan(args, mp=8, cp=4, seq=8192, batch=2, train=True).memory
    assert cp["activations"] == p["activations"] // 4 and cp["loss head"] == p["loss head"] // 4


def saved_bytes(fn):
    """Bytes of distinct tensors autograd saves for backward while running fn() (weights excluded)."""
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()  # views of one tensor count once
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


@pytest.mark.parametrize("shape", [dict(dim=128, n_heads=8, n_kv_heads=2, hidden_dim=352),
                                   dict(dim=192, n_heads=6, n_kv_heads=6, hidden_dim=512)])
def test_activation_formula_matches_what_autograd_saves(shape):
    args = ModelArgs(n_layers=2, vocab_size=320, max_seq_len=128, **shape)
    T = 96
    block = TransformerBlock(0, args).to(torch.bfloat16)
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
    x = torch.randn(1, T, args.dim, dtype=torch.bfloat16, requires_grad=True)
    freqs = precompute_freqs_cis(args)[:T]
    saved, _ = saved_bytes(lambda: block(x, freqs))
    measured = sum(n for ptr, n in saved.items() if ptr not in weights | {freqs.untyped_storage().data_ptr()})
    assert measured == plan.activation_bytes_per_token(args) * T

    # The whole model and its loss: the layers, the final norm, fp32 logits and their log-softmax.
    model = Transformer(args).to(torch.bfloat16)
    model.init_weights(0)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    tokens = torch.randint(0, args.vocab_size, (1, T))

    def step():
        logits = model(tokens)
        return logits, F.cross_entropy(logits.view(-1, args.vocab_size), tokens.view(-1))

    saved, (logits, _) = saved_bytes(step)
    ignored = weights | {model.freqs_cis.untyped_storage().data_ptr(), tokens.untyped_storage().data_ptr()}
    measured = sum(n for ptr, n in saved.items() if ptr not in ignored) + logits.numel() * 4
    p = plan.make_plan(args, seq=T, train=True).memory
    assert measured - 4 == p["activations"] + p["loss head"]  # nll_loss also keeps an fp32 scalar


def test_fits_decisions():
    a8, a70 = args_of("llama3.1-8b"), args_of("llama3.1-70b")
    assert plan.make_plan(a8, seq=131072, gpu="h100").fits  # 14.96 + 16 GiB
    assert not plan.make_plan(a8, seq=131072, gpu="rtx4090").fits  # 31 GiB > 24
    assert plan.make_plan(a8, seq=8192, gpu="rtx4090").fits  # 14.96 + 1 GiB < 21.6
    assert not plan.make_plan(a70, seq=8192, gpu="h100").fits  # 131 GiB of weights
    assert plan.make_plan(a70, mp=8, seq=131072, gpu="h100").fits
    assert not plan.make_plan(a8, seq=8192, train=True).fits  # 16 bytes/param = 120 GiB
    # 8B, mp 8, 8K: 15 GiB of states + 1.2 GiB loss head (its vocabulary slice) + 2.6 GiB
    # checkpointed (20 GiB without)
    p = plan.make_plan(a8, mp=8, seq=8192, train=True, gpu="a100-40gb")
    assert p.fits and p.memory["total (checkpointed)"] < 36 * GiB < p.memory["total"]
    assert plan.make_plan(a8, mp=8, seq=8192, train=True, gpu="rtx4090").fits  # 18.8 GiB of 21.6
    assert not plan.make_plan(a8, mp=4, seq=8192, train=True, gpu="rtx4090").fits  # 30 GiB of states


def test_speed_estimates_by_hand():
    a8 = args_of("llama3.1-8b")
    matmul_bytes = (8_030_261_248 - 128256 * 4096) * 2
    p = plan.make_plan(a8, seq=131072, batch=1, gpu="h100")
    assert p.speed["decode tokens/s (per replica, full cache)"][0] == pytest.approx(3.35e12 / (matmul_bytes + 16 * GiB))
    n = 8_030_261_248 - 128256 * 4096 - 4096 * (2 * 32 + 1)  # multiplied weights: no embedding, no norms
    flops = 6 * n * 8192 + 12 * 32 * 32 * 128 * 8192**2  # PaLM's count: attention's full square
    p = plan.make_plan(a8, mp=8, dp=16, seq=8192, train=True, gpu="h100", mfu=0.5)
    assert p.speed["step time"][0] == pytest.approx(flops / 8 / (989e12 * 0.5))
    assert p.speed["training tokens/s (all GPUs)"][0] == pytest.approx(16 * 8192 / p.speed["step time"][0])


@pytest.mark.parametrize("name", ["llama3.1-8b", "llama3.2-1b", "llama3.1-405b"])
def test_plan_and_training_metrics_count_the_same_flops(name):
    """One FLOPs count and one GPU table: the planner's step time is the training loop's FLOPs per
    token (what its MFU divides by) at the table's peak, and the matmul weights agree."""
    from llama.common import flops
    from llama.train import metrics as train_metrics

    args = args_of(name)
    norms = args.dim * (2 * args.n_layers + 1)  # read by a forward pass (the planner's "matmul"), not multiplied
    assert plan.parameter_counts(args)["matmul"] - norms == train_metrics.matmul_params(args)
    p = plan.make_plan(args, mp=8, dp=2, seq=4096, batch=2, train=True, gpu="h200", mfu=0.5)
    per_gpu = train_metrics.flops_per_token(args, 4096) * 2 * 4096 / 8
    assert p.speed["step time"][0] == pytest.approx(per_gpu / (p.gpu.bf16_tflops * 1e12 * 0.5), rel=1e-12)
    assert plan.GPUS is flops.GPUS and train_metrics.peak_tflops is flops.peak_tflops
    for device_name, gpu in [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100-pcie"),
                             ("NVIDIA GH200 480GB", "gh200"), ("NVIDIA L40S", "l40s"), ("NVIDIA A10G", "a10g")]:
        assert flops.gpu_by_cuda_name(device_name) is plan.GPUS[gpu]


def test_cli_prints_the_plan(capsys):
    assert plan.main(["--model", f"{CONFIGS}/llama3.1-8b.json", "--mp", "8", "--dp", "16",
                      "--seq", "131072", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "8,030,261,248 parameters" in out and "2.00 GiB" in out and "fits" in out


@pytest.mark.parametrize("argv, message", [
    (["--gpu", "h1000"], "--gpu 'h1000' is not known"),
    (["--mp", "3"], "--mp 3 does not divide n_heads=32"),
    (["--mp", "12"], "--mp 12 does not divide n_heads=32"),
    (["--seq", "0"], "--seq 0"),
    (["--cp", "3"], "--cp 3 does not divide --seq"),
    (["--zero", "4"], "--zero 4"),
])
def test_bad_input_is_one_line_and_nonzero(argv, message, capsys):
    assert plan.main(["--model", f"{CONFIGS}/llama3.1-8b.json", "--seq", "8192", *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("error:")


def test_model_by_name(capsys):
    assert plan.load_model_args("llama3.1-70b") == plan.load_model_args(CONFIGS / "llama3.1-70b.json")
    assert plan.main(["--model", "llama3.1-8b", "--seq", "131072"]) == 0
    assert "16.00 GiB" in capsys.readouterr().out
    assert plan.main(["--model", "llama9"]) == 1
    assert "llama3.1-405b" in capsys.readouterr().err  # the message lists the names


def test_bad_model_files(tmp_path, capsys):
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "llama2.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": -1}))
    (tmp_path / "odd.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4, "wings": 2}))
    for name, message in [("missing.json", "no such file"), ("broken.json", "not valid JSON"),
                          ("llama2.json", "vocab_size is -1"), ("odd.json", "wings")]:
        assert plan.main(["--model", str(tmp_path / name)]) == 1
        err = capsys.readouterr().err
        assert name in err and message in err and err.count("\n") == 1


@pytest.mark.slow  # a fresh interpreter importing torch: ~5-10 s on a busy 2-core machine
def test_cli_process_exits_nonzero_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "llama.plan", "--model", f"{CONFIGS}/llama3.1-8b.json",
                           "--gpu", "tpu"], capture_output=True, text=True, cwd=CONFIGS)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "choose one of" in proc.stderr and "h100" in proc.stderr


# ---------------------------------------------------------------------------- LoRA (--lora R)


def test_lora_parameters_of_8b_by_hand():
    # r * (in + out) for q (4096+4096), k and v (4096+1024), o (4096+4096), gate/up/down (4096+14336)
    per_layer = 8 * (8192 + 5120 + 5120 + 8192 + 3 * 18432)
    assert lora.count_lora_parameters(args_of("llama3.1-8b"), 8) == 32 * per_layer == 20_971_520
    # MP 2: A replicated for column layers and B for row layers; the other half split
    replicated = 7 * 8 * 4096  # A (r x 4096) of q, k, v, gate, up; B (4096 x r) of o, down
    assert lora.count_lora_parameters(args_of("llama3.1-8b"), 8, mp=2) == (
        32 * (replicated + (per_layer - replicated) // 2))


def test_lora_8b_at_8k_tokens_fits_a_24_gib_gpu_where_full_fine_tuning_does_not():
    args = args_of("llama3.1-8b")
    adapted = plan.make_plan(args, seq=8192, gpu="rtx4090", lora=8, loss_chunks=8)
    assert adapted.train and adapted.fits and adapted.total_bytes < 21 * GiB
    assert adapted.memory["optimizer"] == 20_971_520 * 8 and adapted.memory["gradients"] == 20_971_520 * 4
    assert adapted.memory["weights"] == 8_030_261_248 * 2 + 20_971_520 * 4
    full = plan.make_plan(args, seq=8192, gpu="rtx4090", train=True, loss_chunks=8)
    assert not full.fits and full.total_bytes > 120 * GiB
    # honest about what tips it: the fp32 logits of 8K tokens x 128K vocabulary alone are 8 GiB
    assert not plan.make_plan(args, seq=8192, gpu="rtx4090", lora=8).fits


def test_lora_cli(capsys):
    assert plan.main(["--model", "llama3.1-8b", "--lora", "8", "--gpu", "rtx4090"]) == 0
    out = capsys.readouterr().out
    assert "LoRA r=8" in out and "20,971,520 trainable" in out
    assert "does NOT fit" in out and "with --loss-chunks 8 (loss_chunks=8 in train.py): " in out and "(fits)" in out
    assert plan.main(["--model", "llama3.1-8b", "--lora", "8", "--loss-chunks", "8", "--gpu", "rtx4090"]) == 0
    assert "\nfits: " in capsys.readouterr().out
    assert plan.main(["--model", "llama3.1-8b", "--lora", "-1"]) == 1
    assert "--lora -1" in capsys.readouterr().err


def test_training_refuses_more_model_parallel_ranks_than_kv_heads():
    # as train.py (llama.parallel.check_model_parallel(training=True)); inference may duplicate K/V heads
    a405 = args_of("llama3.1-405b")
    assert plan.make_plan(a405, mp=16, seq=8192).fits is not None
    with pytest.raises(plan.PlanError, match="exceeds n_kv_heads=8"):
        plan.make_plan(a405, mp=16, cp=16, dp=8, zero=3, seq=131072, train=True, gpu="h200")
    assert plan.make_plan(a405, mp=8, cp=16, dp=32, zero=3, seq=131072, train=True, gpu="h100").fits


PEAK_SCRIPT = """
import sys, torch
from llama.model import ModelArgs, Transformer
from llama.train.loop import loss_sum
V, T = 32768, 2048
model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=V, multiple_of=32, max_seq_len=T))
model.init_weights(0)
x, y = torch.randint(0, V, (1, T)), torch.randint(0, V, (1, T))
loss_sum(model, x[:, :8], y[:, :8]).backward()  # the allocator's small pieces, before the baseline
# the peak resident memory of this process image: VmHWM starts afresh at exec, whereas ru_maxrss
# keeps the forking parent's (a pytest process holding models already) across exec
rss = lambda: next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')) * 1024
base = rss()
loss_sum(model, x, y).backward()
print((rss() - base) / (V * T))
"""


@pytest.mark.slow
def test_the_loss_heads_backward_peaks_at_12_bytes_per_vocabulary_entry():
    """What "loss head" + "loss head (backward)" count (8 + 4 bytes x vocab per token): the peak resident
    memory a training step adds over the model's, in a fresh process, dominated by the (T, V) fp32 tensors
    (a 32K vocabulary, 2,048 tokens: 256 MiB each; the rest of the model is tiny)."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert 11.5 < float(run.stdout) < 13.0, run.stdout
