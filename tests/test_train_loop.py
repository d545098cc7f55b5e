"""The training loop: schedule, optimizer groups, gradient norm, FLOPs; the loss going down into a
checkpoint generate.py reads; determinism, recomputation, autocast, a diverged run; parallel layouts."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from llama.model import ModelArgs, Transformer
from llama.train.config import DEFAULT_MODEL, TrainConfig, load_config
from llama.train.metrics import flops_per_token, format_record, matmul_params, overfitting_warning
from llama.train.loop import TrainingError, global_grad_norm, lr_at, make_optimizer
from tests.helpers import ROOT, TINY_TRAIN, free_port, read_metrics, run_distributed, tiny_train as train, train_worker


# ---------------------------------------------------------------------------- loop pieces


def test_schedule():
    cfg = load_config(None, ["lr=1.0", "min_lr=0.1", "warmup_steps=4", "max_steps=24"])
    lrs = [lr_at(s, cfg) for s in range(24)]
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[14] == pytest.approx(0.55)  # halfway down the cosine: (1 + 0.1) / 2
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lr_at(24, cfg) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices():
    model = Transformer(ModelArgs(**DEFAULT_MODEL, tie_word_embeddings=True))
    opt = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))  # tied: once


def test_grad_norm_single_process_is_torch_norm():
    model = Transformer(ModelArgs(**DEFAULT_MODEL))
    model.init_weights(0)
    tokens = torch.randint(0, 2048, (2, 16))
    torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert global_grad_norm(model).item() == pytest.approx(expected.item(), rel=1e-6)


def test_overfitting_warning_rule():
    """The issue's run: validation 1.72 -> 1.58 -> 1.66 while the training loss fell: warned at step 30,
    naming both and the step of the lowest validation loss; no warning while both fall, for a rise within
    1%, or when the training loss rose too (that is not over-fitting)."""
    falling = [3.8 - 0.12 * i for i in range(30)]  # steps 1..30
    warning = overfitting_warning({10: 1.72, 20: 1.58, 30: 1.66}, falling, 0, 10)
    assert warning and "1.5800 -> 1.6600" in warning and "step 20" in warning
    assert overfitting_warning({10: 1.72, 20: 1.58}, falling, 0, 10) is None  # both fell
    assert overfitting_warning({10: 1.72, 20: 1.58, 30: 1.59}, falling, 0, 10) is None  # +0.6%: noise
    assert overfitting_warning({10: 1.72, 20: 1.58, 30: 1.66}, falling[::-1], 0, 10) is None  # train rose
    assert overfitting_warning({30: 1.66}, falling, 0, 10) is None  # nothing to compare with
    resumed = overfitting_warning({25: 1.58, 30: 1.66}, falling[20:], 20, 5)  # losses from step 21 on
    assert resumed and "since step 25" in resumed
    record = {"step": 30, "loss": 0.3, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 100.0, "tflops": 0.1,
              "mfu": None, "memory_gb": 1.0, "val_loss": 1.66, "warning": warning}
    assert format_record(record).splitlines()[1] == f"warning: {warning}"


@pytest.mark.slow  # 30 steps with 10 evaluations: ~15 s on a quiet 2-core machine
def test_overfitting_is_warned_once_in_the_log_and_metrics(corpus, tmp_path, capsys):
    """A tiny model on one short file (keyword.py: 10 training sequences) at a high lr learns it by heart:
    the validation loss turns up while the training loss keeps falling. The run says so once, at the
    first evaluation 1% above the lowest, in the log and in that step's metrics.jsonl record."""
    import keyword

    _, tokenizer = corpus
    (tmp_path / "small.py").write_text(Path(keyword.__file__).read_text())
    overrides = [o for o in TINY_TRAIN if not o.startswith(("eval_every", "log_every"))]
    cfg = load_config(None, overrides + [f"data={tmp_path / 'small.py'}", f"tokenizer={tokenizer}",
                                         f"out_dir={tmp_path / 'run'}", f"data_cache={tmp_path / 'cache'}",
                                         "val_fraction=0.3", "max_steps=30", "eval_every=3", "log_every=3",
                                         "lr=1e-2", "min_lr=1e-2", "warmup_steps=0", "save_every=3", "keep_last=0"])
    from train import train as run_train

    val = run_train(cfg)["val_losses"]
    warned = [r for r in read_metrics(tmp_path / "run") if "warning" in r]
    assert len(warned) == 1, warned
    step = warned[0]["step"]
    best = min((s for s in val if s < step), key=val.get)
    assert val[step] > 1.01 * val[best] and f"since step {best}" in warned[0]["warning"]
    earlier_rises = [s for s in val if min(val) < s < step and val[s] > 1.01 * min(val[t] for t in val if t < s)]
    assert not earlier_rises  # warned at the first rise
    assert capsys.readouterr().out.count("warning: over-fitting") == 1
    # Resumed from the checkpoint before the warning, the run warns at the same step with the same words:
    # the evaluations before the checkpoint come back with it.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run", resumed)
    for later in resumed.glob("step_*"):
        if int(later.name[5:]) > step - 3:
            shutil.rmtree(later)
    (resumed / "latest").write_text(f"step_{step - 3:06d}")
    run_train(dataclasses.replace(cfg, out_dir=str(resumed), resume=True))
    again = [(r["step"], r["warning"]) for r in read_metrics(resumed) if "warning" in r]
    assert again == [(step, warned[0]["warning"])]


def test_closing_lines_fit_the_run():
    from llama.train.setup import next_commands

    sft_lora = load_config(str(ROOT / "configs/train/lora.toml"), ["out_dir=out/my run"])
    lines = next_commands(sft_lora, "out/my run/step_000030").splitlines()
    assert lines == ["chat with it:  python generate.py --ckpt-dir smollm2 --lora 'out/my run/step_000030' --chat",
                     "compare:       python -m llama.eval compare smollm2 'out/my run/step_000030' "
                     "--data configs/train/chat_example.jsonl"]
    full_text = load_config(None, ["init_from=smollm2"])
    assert next_commands(full_text, "out/x/step_000200").splitlines()[0] == \
        "sample:        python generate.py --ckpt-dir out/x/step_000200"
    assert len(next_commands(load_config(None, []), "out/default/step_000200").splitlines()) == 1  # no base
    dpo = load_config(str(ROOT / "configs/train/dpo.toml"), [])  # its pairs file goes to --pairs (--data refused it)
    assert next_commands(dpo, "out/dpo/step_000040").splitlines() == [
        "chat with it:  python generate.py --ckpt-dir smollm2 --lora out/dpo/step_000040 --chat",
        "compare:       python -m llama.eval compare smollm2 out/dpo/step_000040 --pairs configs/train/dpo_example.jsonl"]


def test_flops_from_the_shape():
    """The parameter count behind MFU matches the published Llama 3.1 8B total (8.03B)."""
    args = ModelArgs(**json.loads((ROOT / "configs/models/llama3.1-8b.json").read_text()))
    norms = args.dim * (2 * args.n_layers + 1)
    assert (matmul_params(args) + args.vocab_size * args.dim + norms) / 1e9 == pytest.approx(8.03, abs=0.005)
    small = ModelArgs(**DEFAULT_MODEL)
    with torch.device("meta"):
        model = Transformer(small)
    weights = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "tok_embeddings" not in n)
    assert matmul_params(small) == weights
    assert flops_per_token(small, 128) == 6 * weights + 12 * 4 * 4 * 32 * 128


# ---------------------------------------------------------------------------- runs


def test_loss_decreases_and_checkpoint_loads(corpus, tmp_path):
    data_dir, tok = corpus
    out = tmp_path / "run"
    result = train(data_dir, out, "max_steps=30", "eval_every=15", "eval_batches=2", "save_every=15")
    losses = result["losses"]
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5, losses
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 31))
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert len(val) == 2 and val[1] < val[0]
    ckpt = Path(result["checkpoint"])
    assert ckpt == out / "step_000030" and (out / "latest").read_text() == "step_000030"
    assert sorted(p.name for p in ckpt.iterdir()) == ["consolidated.00.pth", "params.json", "tokenizer.model",
                                                      "train_state.00.pth"]
    params = json.loads((ckpt / "params.json").read_text())
    assert params["dim"] == 64 and params["vocab_size"] == 640 and "max_seq_len" not in params
    # Meta's loading recipe: ModelArgs(**params.json) + a strict load_state_dict.
    model = Transformer(ModelArgs(**params, max_seq_len=32))
    model.load_state_dict(torch.load(ckpt / "consolidated.00.pth", weights_only=True), strict=True)
    x, y = next(iter(_val_batches(data_dir)))
    loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
    assert loss.item() < losses[0] - 1.0
    # What generate.py does with it: Llama.build finds the weights and the tokenizer in the step dir.
    from llama.generation import Llama

    llama = Llama.build(str(ckpt), max_seq_len=32, max_batch_size=1)
    out = llama.text_completion(["def "], max_gen_len=12, temperature=0.0)
    assert isinstance(out[0]["generation"], str) and out[0]["generation"]


def _val_batches(data_dir):
    from llama.train.batches import Batches

    return Batches(data_dir, 32, 0).val_micro_batches(1, 8, 8, 0, 1)


@pytest.fixture(scope="module")
def plain(corpus, tmp_path_factory):
    """Two steps of the tiny config, the reference of the comparisons below."""
    return train(corpus[0], tmp_path_factory.mktemp("plain"), "max_steps=2")


def test_same_config_same_curve(corpus, plain, tmp_path):
    data_dir, _ = corpus
    two = train(data_dir, tmp_path / "b", "max_steps=2")
    other = train(data_dir, tmp_path / "c", "max_steps=2", "seed=7")
    assert plain["losses"] == two["losses"] and plain["losses"] != other["losses"]


def test_activation_checkpointing_and_autocast(corpus, plain, tmp_path):
    """Recomputing blocks in backward changes memory, not results; bf16 autocast still trains."""
    data_dir, _ = corpus
    recomputed = train(data_dir, tmp_path / "b", "max_steps=2", "activation_checkpointing=true")
    assert recomputed["losses"] == pytest.approx(plain["losses"], abs=1e-6)
    bf16 = train(data_dir, tmp_path / "c", "max_steps=2", "dtype=bfloat16")
    assert bf16["losses"] == pytest.approx(plain["losses"], abs=0.05) and bf16["losses"] != plain["losses"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    data_dir, _ = corpus
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"loss is (nan|inf).*last good checkpoint is .*step_0000\d\d") as e:
        train(data_dir, out, "max_steps=50", "save_every=1", "lr=1e12", "warmup_steps=3", "grad_clip=0")
    latest = (out / "latest").read_text()
    step = int(latest.split("_")[1])
    assert f"at step {step + 1}" in str(e.value)
    weights = torch.load(out / latest / "consolidated.00.pth", weights_only=True)
    assert all(torch.isfinite(w).all() for w in weights.values())


# ---------------------------------------------------------------------------- processes (slow)


def _torchrun(nproc: int, *args, timeout=300):
    import os
    import shutil
    import subprocess
    import sys

    launcher = [shutil.which("torchrun")] if shutil.which("torchrun") else [sys.executable, "-m", "torch.distributed.run"]
    cmd = launcher + ["--nproc_per_node", str(nproc), "--master_port", str(free_port()), str(ROOT / "train.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.slow
def test_parallel_layouts_match_one_process(corpus, tmp_path):
    """Global batch fixed (8 sequences, micro-batches of 2: accumulation everywhere): MP=2 x DP=1
    (through the real torchrun entry point), MP=1 x DP=2 and MP=2 x DP=2 reproduce one process's
    losses and gradient norms (clipping is active: grad_clip=0.5) within 1e-4."""
    data_dir, _ = corpus
    common = ["max_steps=4", "micro_batch_size=2", "save_every=4"]
    single = train(data_dir, tmp_path / "single", *common)
    reference = read_metrics(tmp_path / "single")
    out = tmp_path / "mp2dp1"
    done = _torchrun(2, *TINY_TRAIN, f"data={data_dir}", f"out_dir={out}", *common, "model_parallel_size=2")
    assert done.returncode == 0, done.stderr[-3000:]
    curves = {"mp2dp1": read_metrics(out)}
    for world, mp in [(2, 1), (4, 2)]:
        name = f"mp{mp}dp{world // mp}"
        results = run_distributed(train_worker, world, data_dir, tmp_path / name, common + [f"model_parallel_size={mp}"])
        assert all(r["losses"] == results[0]["losses"] for r in results)  # every rank saw the same loss
        curves[name] = read_metrics(tmp_path / name)
    for name, curve in curves.items():
        assert len(curve) == 4
        for got, want in zip(curve, reference):
            assert got["loss"] == pytest.approx(want["loss"], abs=1e-4), name
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], abs=1e-4), name
    assert [m["loss"] for m in reference] == single["losses"]
    # The MP=2 checkpoint: two Meta shards that load at MP=1 and give the one-process model's logits.
    ckpt = out / "step_000004"
    assert (ckpt / "consolidated.00.pth").is_file() and (ckpt / "consolidated.01.pth").is_file()
    from llama.checkpoint import load_model

    merged = load_model(ckpt, max_seq_len=32)
    alone = load_model(tmp_path / "single/step_000004", max_seq_len=32)
    tokens = torch.randint(0, 640, (2, 32))
    torch.testing.assert_close(merged(tokens), alone(tokens), atol=2e-4, rtol=1e-4)


def test_eval_text_is_read_again_when_its_file_changes(corpus, tmp_path):
    """The eval_data text and its tokenizer are cached per (path, size, mtime): a file edited between
    two runs in one process (a notebook) is read again, not served stale from the cache."""
    import os

    from llama.train.loop import _eval_text, _stamp

    _, tok = corpus
    text = tmp_path / "eval.txt"
    text.write_text("first version")
    assert _eval_text(_stamp(str(text)), _stamp(str(tok)))[0] == "first version"
    text.write_text("second, longer version")
    os.utime(text, ns=(text.stat().st_atime_ns, text.stat().st_mtime_ns + 1))  # a later mtime even on coarse clocks
    assert _eval_text(_stamp(str(text)), _stamp(str(tok)))[0] == "second, longer version"
