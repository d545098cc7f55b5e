"""train.py and the loop: config, loss going down, exact resume, checkpoints, faults, layouts."""

import dataclasses
import json
import shutil
import tomllib
from pathlib import Path

import pytest
import torch

from llama.model import ModelArgs, Transformer
from llama.train.config import DEFAULT_MODEL, ConfigError, TrainConfig, check_layout, load_config
from llama.train.metrics import flops_per_token, matmul_params
from llama.train.loop import TrainingError, global_grad_norm, lr_at, make_optimizer
from tests.helpers import ROOT, TINY_TRAIN, cli, read_metrics, tiny_config, tiny_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return tiny_corpus(tmp_path_factory.mktemp("corpus"))


def train(data_dir, out_dir, *overrides):
    from train import train as run

    return run(tiny_config(data_dir, out_dir, *overrides))


# ---------------------------------------------------------------------------- config


def test_default_toml_is_the_dataclass_defaults():
    table = tomllib.loads((ROOT / "configs/train/default.toml").read_text())
    model = table.pop("model")
    defaults = dataclasses.asdict(TrainConfig())
    defaults.pop("model")
    assert table == defaults
    assert model == DEFAULT_MODEL


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs/train").glob("*.toml")))
def test_shipped_configs_parse(name):
    cfg = load_config(str(ROOT / "configs/train" / name))
    if not cfg.init_from:
        cfg.model_args(2048)


def test_overrides_and_unknown_keys(tmp_path):
    cfg = load_config(None, ["max_steps=7", "lr=1e-4", "out_dir=out/x y", "model.dim=96", "compile=true"])
    assert (cfg.max_steps, cfg.lr, cfg.out_dir, cfg.model["dim"], cfg.compile) == (7, 1e-4, "out/x y", 96, True)
    assert cfg.model_args(1000).n_layers == DEFAULT_MODEL["n_layers"]  # [model] keys go on top of the default
    with pytest.raises(ConfigError, match="unknown config key 'max_step'.*did you mean 'max_steps'"):
        load_config(None, ["max_step=3"])
    with pytest.raises(ConfigError, match="unknown config key 'model.dimm'"):
        load_config(None, ["model.dimm=3"])
    with pytest.raises(ConfigError, match="'max_steps' .* must be int"):
        load_config(None, ["max_steps=lots"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(None, ["max_steps"])
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = 1e-3\nlearning_rate = 2\n")
    with pytest.raises(ConfigError, match=f"'learning_rate' in {bad}"):
        load_config(str(bad))


def test_layout_checks():
    args = ModelArgs(**DEFAULT_MODEL)
    with pytest.raises(ConfigError, match="does not divide n_heads=4"):  # refused as the config is read
        load_config(None, ["model_parallel_size=3"])
    cfg = TrainConfig(model_parallel_size=3)
    with pytest.raises(ConfigError, match="does not divide the 4 processes"):
        check_layout(cfg, args, 4)
    with pytest.raises(ConfigError, match="does not divide n_heads=4"):
        check_layout(cfg, args, 3)
    cfg = load_config(None, ["model_parallel_size=2", "batch_size=12", "micro_batch_size=4"])
    with pytest.raises(ConfigError, match="batch_size=12 must split evenly over 2 data-parallel ranks"):
        check_layout(cfg, args, 4)
    assert check_layout(load_config(None, ["model_parallel_size=2"]), args, 4) == (2, 8)  # micro-batch: 16 -> 8
    assert check_layout(load_config(None, ["batch_size=32", "micro_batch_size=8"]), args, 2) == (2, 8)


def test_cli_errors_are_one_line(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        (["max_stepz=3"], "unknown config key 'max_stepz'"),
        ([f"data={tmp_path / 'nope'}"], "does not exist"),
        ([f"data={empty}"], "is empty"),
        (["model_parallel_size=2"], "needs 2 processes"),
    ]
    for args, message in cases:
        done = cli(*args, f"out_dir={tmp_path / 'out'}")
        assert done.returncode == 1, done.stderr
        assert done.stderr.strip().startswith("error:") and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # failed before any work


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


def test_sft_from_a_checkpoint(corpus, tmp_path):
    """init_from one of our checkpoints (tokenizer found next to it), chat jsonl, assistant-only loss."""
    from train import train as run

    data_dir, _ = corpus
    base = train(data_dir, tmp_path / "base", "max_steps=1")["checkpoint"]
    chats = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Count to {n}."},
                          {"role": "assistant", "content": " ".join(str(i) for i in range(1, n + 1))}]}
            for n in range(1, 13)]
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows))
    keep = [o for o in TINY_TRAIN if not o.startswith("model.")]
    cfg = load_config(None, keep + [f"init_from={base}", f"data={chats}", "sft=true", "max_steps=12",
                                    f"out_dir={tmp_path / 'sft'}", f"data_cache={tmp_path / 'cache'}", "lr=1e-2"])
    result = run(cfg)
    assert sum(result["losses"][-3:]) / 3 < result["losses"][0] - 0.5, result["losses"]
    assert (tmp_path / "sft/step_000012/tokenizer.model").is_file()


def test_resume_is_exact(corpus, tmp_path):
    data_dir, _ = corpus
    full = train(data_dir, tmp_path / "full", "max_steps=10", "save_every=5", "keep_last=0")
    # A crash between steps 5 and 10: only the step-5 checkpoint survives.
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "full", crashed)
    shutil.rmtree(crashed / "step_000010")
    (crashed / "latest").write_text("step_000005")
    resumed = train(data_dir, crashed, "max_steps=10", "save_every=5", "keep_last=0", "resume=true")
    assert resumed["first_step"] == 5
    assert resumed["losses"] == full["losses"][5:]  # bit for bit on CPU
    a = torch.load(tmp_path / "full/step_000010/consolidated.00.pth", weights_only=True)
    b = torch.load(crashed / "step_000010/consolidated.00.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["step"] for m in read_metrics(crashed)] == list(range(1, 11))  # history rewritten, not doubled


def test_same_config_same_curve(corpus, tmp_path):
    data_dir, _ = corpus
    one = train(data_dir, tmp_path / "a", "max_steps=4")
    two = train(data_dir, tmp_path / "b", "max_steps=4")
    other = train(data_dir, tmp_path / "c", "max_steps=4", "seed=7")
    assert one["losses"] == two["losses"] and one["losses"] != other["losses"]


def test_activation_checkpointing_and_autocast(corpus, tmp_path):
    """Recomputing blocks in backward changes memory, not results; bf16 autocast still trains."""
    data_dir, _ = corpus
    plain = train(data_dir, tmp_path / "a", "max_steps=3")
    recomputed = train(data_dir, tmp_path / "b", "max_steps=3", "activation_checkpointing=true")
    assert recomputed["losses"] == pytest.approx(plain["losses"], abs=1e-6)
    bf16 = train(data_dir, tmp_path / "c", "max_steps=3", "dtype=bfloat16")
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
    import shutil as sh
    import subprocess
    import sys

    launcher = [sh.which("torchrun")] if sh.which("torchrun") else [sys.executable, "-m", "torch.distributed.run"]
    cmd = launcher + ["--nproc_per_node", str(nproc), "--master_port", str(_free_port()), str(ROOT / "train.py"), *args]
    env = dict(__import__("os").environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _free_port():
    from tests.helpers import free_port

    return free_port()


@pytest.mark.slow
def test_parallel_layouts_match_one_process(corpus, tmp_path):
    """Global batch fixed (8 sequences, micro-batches of 2: accumulation everywhere): MP=2 x DP=1
    (through the real torchrun entry point), MP=1 x DP=2 and MP=2 x DP=2 reproduce one process's
    losses and gradient norms (clipping is active: grad_clip=0.5) within 1e-4."""
    from tests.helpers import run_distributed
    from tests.helpers import TINY_TRAIN, train_worker

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


@pytest.mark.slow
def test_sigkill_mid_training_resumes_from_last_complete_checkpoint(corpus, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import TINY_TRAIN

    data_dir, _ = corpus
    out = tmp_path / "killed"
    base = TINY_TRAIN + [f"data={data_dir}", "decay_steps=40", "save_every=4"]  # schedule independent of max_steps
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *base, f"out_dir={out}", "max_steps=100000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 240
    while time.time() < deadline and not ((out / "latest").is_file() and (out / "latest").read_text() >= "step_000008"):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = int((out / "latest").read_text().split("_")[1])
    assert saved >= 8
    resumed = train(data_dir, out, "decay_steps=40", "save_every=4", f"max_steps={saved + 3}", "resume=true")
    reference = train(data_dir, tmp_path / "reference", "decay_steps=40", f"max_steps={saved + 3}")
    assert resumed["first_step"] == saved
    assert resumed["losses"] == reference["losses"][saved:]


KILL_DURING_SAVE = """
import os, runpy, signal, sys, torch
real_save, calls = torch.save, []
def save_then_die(obj, f, *args, **kwargs):
    calls.append(1)
    real_save(obj, f, *args, **kwargs)
    if len(calls) == 3:  # the second checkpoint's first file (its weights) is written: die now
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_sigkill_during_save_leaves_the_previous_checkpoint(corpus, tmp_path):
    import os
    import subprocess
    import sys

    from tests.helpers import TINY_TRAIN

    data_dir, _ = corpus
    out = tmp_path / "run"
    args = TINY_TRAIN + [f"data={data_dir}", f"out_dir={out}", "max_steps=6", "save_every=3"]
    done = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(ROOT / "train.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    assert (out / "latest").read_text() == "step_000003"
    assert (out / ".step_000006.tmp").is_dir() and not (out / "step_000006").exists()
    from llama.checkpoint import load_model

    load_model(out / "step_000003", max_seq_len=32)  # the previous checkpoint is complete
    resumed = train(data_dir, out, "max_steps=6", "save_every=3", "resume=true")
    assert resumed["first_step"] == 3 and len(resumed["losses"]) == 3
    assert (out / "latest").read_text() == "step_000006" and not (out / ".step_000006.tmp").exists()


# ---------------------------------------------------------------------------- fine-tune round trips


DIALOG = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."},
          {"role": "user", "content": "And 3 + 3?"}]


def _tiny_gguf_with_smollm2_tokenizer(path, smollm2_gguf):
    """A 1-layer model that carries SmolLM2's real tokenizer metadata (49152 tokens, ChatML template)."""
    import gguf

    from llama.checkpoint.gguf import GGUFFile
    from tests.helpers import gguf_name

    meta = GGUFFile(smollm2_gguf).metadata
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=49152, hidden_dim=64,
                     rope_theta=100000.0, tie_word_embeddings=True)
    model = Transformer(args)
    model.init_weights(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1), w.add_context_length(8192), w.add_embedding_length(32), w.add_feed_forward_length(64)
    w.add_head_count(2), w.add_head_count_kv(1), w.add_rope_freq_base(100000.0), w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(49152), w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"]), w.add_token_types([int(t) for t in meta["tokenizer.ggml.token_type"]])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_pad_token_id(2), w.add_add_bos_token(False)
    w.add_chat_template(meta["tokenizer.chat_template"])
    for name, t in model.state_dict().items():
        if name != "output.weight":
            w.add_tensor(gguf_name(name), t.detach().numpy())
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


@pytest.fixture(scope="module")
def fine_tune_sources(tmp_path_factory, corpus, smollm2_gguf, llama3_tokenizer_path):
    """The four kinds of checkpoint a fine-tune starts from, each a tiny model with a real tokenizer."""
    from llama import checkpoint

    root = tmp_path_factory.mktemp("sources")
    sources = {"gguf": _tiny_gguf_with_smollm2_tokenizer(root / "smol.gguf", smollm2_gguf)}
    # HF: transformers' own tokenizer files for SmolLM2 (tokenizer.json, tokenizer_config.json, template)
    transformers = pytest.importorskip("transformers")
    small = checkpoint.load_model(sources["gguf"], max_seq_len=16)
    checkpoint.save_hf(small.state_dict(), small.params, root / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    tok.save_pretrained(root / "hf")
    sources["hf"] = root / "hf"
    for name, tokenizer, vocab in [("meta", llama3_tokenizer_path, 128256), ("bpe", corpus[1], 640)]:
        args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=vocab, hidden_dim=64,
                         tie_word_embeddings=True)
        model = Transformer(args)
        model.init_weights(0)
        checkpoint.save_meta(model.state_dict(), args, root / name)
        shutil.copy(tokenizer, root / name / "tokenizer.model")
        sources[name] = root / name
    return sources


@pytest.mark.parametrize("kind", ["gguf", "hf", "meta", "bpe"])
def test_fine_tune_keeps_the_tokenizer_and_chat_format(kind, fine_tune_sources, tmp_path):
    """A checkpoint fine-tuned from X carries X's tokenizer as small files (no links into a cache):
    the same chat-encoded ids of a dialog, the same stop tokens; SmolLM2 keeps its default system prompt."""
    from llama.checkpoint import default_tokenizer_path
    from llama.tokenizer import load_tokenizer
    from train import train as run

    source = fine_tune_sources[kind]
    text = tmp_path / "text.txt"
    text.write_text("Some words to fine-tune on, repeated. " * 40)
    keep = [o for o in TINY_TRAIN if not o.startswith("model.") and not o.startswith(("seq_len", "batch_size", "micro"))]
    cfg = load_config(None, keep + [f"init_from={source}", f"data={text}", "max_steps=1", "seq_len=16",
                                    "batch_size=2", "micro_batch_size=2", f"out_dir={tmp_path / 'out'}",
                                    f"data_cache={tmp_path / 'cache'}"])
    ckpt = Path(run(cfg)["checkpoint"])
    before, after = load_tokenizer(default_tokenizer_path(source)), load_tokenizer(default_tokenizer_path(ckpt))
    encode = lambda tok: tok.chat_format.encode_dialog_prompt(DIALOG)  # noqa: E731
    assert encode(after) == encode(before)
    assert (after.n_words, after.stop_tokens, after.bos_id, after.add_bos) == \
        (before.n_words, before.stop_tokens, before.bos_id, before.add_bos)
    if kind in ("gguf", "hf"):
        assert before.chat_format.default_system and len(encode(before)) > 30
    assert not any(p.is_symlink() for p in ckpt.iterdir())
    assert sum(p.stat().st_size for p in ckpt.iterdir() if p.name.startswith("tokenizer")) < 16 << 20
    if kind == "gguf":  # the extracted tokenizer.json is a real HF file: transformers encodes alike
        transformers = pytest.importorskip("transformers")
        hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(ckpt / "tokenizer.json"))
        text = "Hello world! 12345 café  \n\n  def f(x):\n\treturn x**2 ünïcode 日本語"
        assert hf.encode(text) == after.encode(text, bos=False, eos=False)


# ---------------------------------------------------------------------------- resume


def test_resume_reuses_the_saved_configuration(corpus, tmp_path):
    """`train.py out_dir=X resume=true` after a run started with other keys continues that run; keys
    given again must agree; a max_steps already reached, or another model_parallel_size, is one line."""
    data_dir, _ = corpus
    out = tmp_path / "run"
    train(data_dir, out, "max_steps=2", "save_every=2")
    done = cli(f"out_dir={out}", "resume=true", "max_steps=3", "log_every=1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "latest").read_text() == "step_000003" and "resumed from" in done.stderr
    cases = [
        (["max_steps=3"], "already at step 3 and max_steps=3"),
        ([], "already at step 3 and max_steps=3"),  # the saved max_steps: nothing left to do
        (["max_steps=5", "model.n_layers=3"], "model.n_layers=3 differs from model.n_layers=2"),
        (["max_steps=5", "seq_len=64"], "seq_len=64 differs from seq_len=32"),
        (["max_steps=5", "model_parallel_size=2"], "python -m llama.convert"),
    ]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for args, message in cases:
        done = cli(f"out_dir={out}", "resume=true", *args)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], done.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # keys given again with the same values are fine
    again = train(data_dir, out, "max_steps=4", "save_every=2", "resume=true")
    assert again["first_step"] == 3


def test_checkpoint_saves_touch_only_their_own_directories(corpus, tmp_path):
    """Pruning and re-saving remove only step directories this code wrote; a user's folders named
    like them, or like a save's temporary, are kept."""
    data_dir, _ = corpus
    out = tmp_path / "run"
    (out / "step_000001").mkdir(parents=True)
    (out / "step_000001/mine.txt").write_text("a user's")
    (out / ".step_000009.tmp").mkdir()
    (out / ".step_000009.tmp/mine.txt").write_text("a user's too")
    train(data_dir, out, "max_steps=4", "save_every=2", "keep_last=1")
    assert (out / "step_000001/mine.txt").read_text() == "a user's"
    assert (out / ".step_000009.tmp/mine.txt").read_text() == "a user's too"
    assert sorted(p.name for p in out.glob("step_*")) == ["step_000001", "step_000004"]
