"""train.py and the loop: config, loss going down, exact resume, checkpoints, faults, layouts."""

import dataclasses
import json
import math
import shutil
import tomllib
from pathlib import Path

import pytest
import torch

from llama import parallel
from llama.model import ModelArgs, Transformer
from llama.train_config import DEFAULT_MODEL, ConfigError, TrainConfig, check_layout, load_config
from llama.train_metrics import flops_per_token, matmul_params
from llama.training import TrainingError, global_grad_norm, lr_at, make_optimizer
from tests.train_helpers import ROOT, cli, read_metrics, tiny_config, tiny_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return tiny_corpus(tmp_path_factory.mktemp("corpus"))


def train(data_dir, out_dir, *overrides):
    from llama.train_setup import train as run

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
    cfg = load_config(None, ["model_parallel_size=3"])
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
    result = train(data_dir, out, "max_steps=40", "eval_every=20", "eval_batches=2", "save_every=20")
    losses = result["losses"]
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5, losses
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 41))
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert len(val) == 2 and val[1] < val[0]
    ckpt = Path(result["checkpoint"])
    assert ckpt == out / "step_000040" and (out / "latest").read_text() == "step_000040"
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


def _val_batches(data_dir):
    from llama.batches import Batches

    return Batches(data_dir, 32, 0).val_micro_batches(1, 8, 8, 0, 1)


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
