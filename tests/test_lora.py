"""LoRA (llama/lora.py, llama/train/adapters.py): the math, model parallelism against one process, the
training contract (adapters only, exact resume), and bad input."""

import json

import pytest
import torch
import torch.nn.functional as F

from llama import lora, parallel
from llama.model import ModelArgs, Transformer
from tests.helpers import run_distributed
from tests.helpers import TINY_TRAIN, cli, run_main, tiny_config, tiny_corpus, train_until_killed

ARGS = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=256, multiple_of=32, max_seq_len=64,
            rope_theta=10000.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_corpus(tmp_path_factory.mktemp("corpus"))


def tiny_model(rank=4, alpha=8.0, seed=7, random_b=True):
    model = Transformer(ModelArgs(**ARGS))
    model.init_weights(seed=seed)
    if rank:
        lora.add_lora(model, rank, alpha, seed=seed)
        if random_b:
            randomize_b(model)
    return model


@torch.no_grad()
def randomize_b(model, seed=3):
    """A trained-looking adapter: B != 0, the same logical tensor on any layout."""
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            g = torch.Generator().manual_seed(seed + len(name) + int(name.split(".")[1]))
            full = torch.randn(parallel.full_shape(name, p.shape), generator=g) * 0.05
            p.copy_(parallel.shard(name, full))


def tokens():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(123))


# ---------------------------------------------------------------------------- the math


def test_fresh_adapter_is_exactly_the_base():
    base = tiny_model(rank=0)
    adapted = tiny_model(rank=4, random_b=False)
    with torch.no_grad():
        assert torch.equal(base(tokens()), adapted(tokens()))


def test_adapter_changes_the_output_by_scale_b_a():
    """The forward term is (alpha/r) B A x: check one projection against the formula directly."""
    model = tiny_model(rank=4, alpha=8.0)
    proj = model.layers[0].attention.wq
    x = torch.randn(3, 64)
    expected = x @ proj.weight.T + 2.0 * (x @ proj.lora_A.weight.T) @ proj.lora_B.weight.T
    torch.testing.assert_close(proj(x), expected)


def test_merged_weights_give_the_unmerged_logits():
    model = tiny_model()
    with torch.no_grad():
        unmerged = model(tokens())
        lora.merge_lora(model)
        merged = model(tokens())
    assert not any(lora.is_lora_name(n) for n in model.state_dict())  # Meta's keys again
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_only_adapters_get_gradients_and_optimizer_state():
    from llama.train.loop import make_optimizer

    model = tiny_model()
    lora.freeze_base(model)
    cfg = tiny_config("stdlib", "unused")
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    lora.check_only_adapters_train(model, optimizer)
    logits = model(tokens())
    F.cross_entropy(logits.flatten(0, 1), tokens().flatten()).backward()
    optimizer.step()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == lora.is_lora_name(name), name
    trainable = sum(p.numel() for p in lora.trainable_parameters(model).values())
    assert trainable == lora.count_lora_parameters(model.params, 4) == 2 * 4 * (
        (64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + 192))
    moments = sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in optimizer.state.values())
    assert moments == 2 * trainable


@pytest.mark.parametrize("rank", [0, 4], ids=["full", "lora"])
def test_chunked_loss_head_gives_the_same_loss_and_gradients(rank):
    """loss_chunks (what lets 8B LoRA at 8K tokens fit 24 GiB): same sum, same gradients."""
    from llama.train.loop import loss_sum

    results = []
    for chunks in (1, 3):
        model = tiny_model(rank=rank)
        if rank:
            lora.freeze_base(model)
        inputs, targets = tokens()[:, :-1], tokens()[:, 1:].clone()
        targets[0, :5] = -100  # an SFT mask
        loss = loss_sum(model, inputs, targets, model, chunks)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss1, grads1), (loss3, grads3) = results
    torch.testing.assert_close(loss3, loss1, atol=1e-5, rtol=1e-6)
    assert grads1.keys() == grads3.keys() and len(grads1) > 0
    for name in grads1:
        torch.testing.assert_close(grads3[name], grads1[name], atol=1e-6, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------- model parallel


def mp_worker(mp: int):
    parallel.init_distributed(mp)
    model = tiny_model()
    lora.freeze_base(model)
    logits = model(tokens()[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), tokens()[:, 1:].flatten()).backward()
    grads = {n: parallel.gather(n, p.grad) for n, p in lora.trainable_parameters(model).items()}
    base_grads = [n for n, p in model.named_parameters() if p.grad is not None and not lora.is_lora_name(n)]
    with torch.no_grad():
        lora.merge_lora(model)
        merged = model(tokens()[:, :-1])
    return {"logits": logits.detach(), "grads": grads, "base_grads": base_grads, "merged": merged}


@pytest.mark.slow
@pytest.mark.parametrize("mp", [2, 4])
def test_model_parallel_logits_and_adapter_grads_match_one_process(mp):
    model = tiny_model()
    lora.freeze_base(model)
    logits = model(tokens()[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), tokens()[:, 1:].flatten()).backward()
    for rank, res in enumerate(run_distributed(mp_worker, mp, mp)):
        torch.testing.assert_close(res["logits"], logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res["merged"], logits, atol=1e-5, rtol=1e-5)  # merge is local per rank
        assert res["base_grads"] == []
        assert res["grads"].keys() == lora.trainable_parameters(model).keys()
        for name, p in lora.trainable_parameters(model).items():
            torch.testing.assert_close(res["grads"][name], p.grad, atol=1e-5, rtol=1e-5, msg=f"{name} rank {rank}")


# ---------------------------------------------------------------------------- training


def train(data_dir, out_dir, *overrides):
    from train import train as run

    return run(tiny_config(data_dir, out_dir, "lora_rank=4", "lora_alpha=8.0", "lr=1e-2", *overrides))


def test_lora_run_saves_adapters_only_and_resumes_exactly(corpus, tmp_path):
    data_dir, _ = corpus
    full = train(data_dir, tmp_path / "full", "max_steps=4", "decay_steps=4")
    train(data_dir, tmp_path / "split", "max_steps=2", "decay_steps=4")
    resumed = train(data_dir, tmp_path / "split", "max_steps=4", "decay_steps=4", "resume=true")
    assert resumed["first_step"] == 2
    assert resumed["losses"] == full["losses"][2:]
    ckpt = tmp_path / "full/step_000004"
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "lora.json", "adapter.00.pth",
            "train_state.00.pth", "params.json"} <= names
    assert not any(n.startswith("consolidated") for n in names)
    adapter = torch.load(ckpt / "adapter.00.pth", weights_only=True)
    assert adapter and all(lora.is_lora_name(k) for k in adapter)
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if ".lora_B." in k)  # it trained
    state = torch.load(ckpt / "train_state.00.pth", weights_only=True)
    moments = sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in state["optimizer"]["state"].values())
    assert moments == 2 * sum(t.numel() for t in adapter.values())
    pointer = json.loads((ckpt / "lora.json").read_text())
    assert pointer["path"] is None and pointer["init_seed"] == 1337 and len(pointer["params_sha256"]) == 64


@pytest.mark.slow
def test_lora_with_activation_checkpointing_and_mp2_dp2_matches_one_process(corpus, tmp_path):
    """4 gloo ranks, MP 2 x DP 2, recomputed blocks, chunked loss head: the same losses as one plain process."""
    from tests.helpers import train_worker

    data_dir, _ = corpus
    single = train(data_dir, tmp_path / "one", "max_steps=3")
    lora_args = ["lora_rank=4", "lora_alpha=8.0", "lr=1e-2", "max_steps=3", "model_parallel_size=2",
                 "activation_checkpointing=true", "loss_chunks=2"]
    results = run_distributed(train_worker, 4, data_dir, tmp_path / "four", lora_args)
    for res in results:
        torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(single["losses"]), atol=2e-5, rtol=1e-5)
    assert (tmp_path / "four/step_000003/adapter.01.pth").is_file()


@pytest.mark.slow
def test_sigkill_mid_lora_run_resumes_to_the_uninterrupted_losses(corpus, tmp_path):
    data_dir, _ = corpus
    out = tmp_path / "killed"
    args = TINY_TRAIN + [f"data={data_dir}", "decay_steps=40", "save_every=3", "lora_rank=4", "lora_alpha=8.0", "lr=1e-2"]
    saved = train_until_killed(args, out, 6)
    assert saved >= 6
    extra = ["decay_steps=40", "save_every=3", f"max_steps={saved + 2}"]
    resumed = train(data_dir, out, *extra, "resume=true")
    reference = train(data_dir, tmp_path / "reference", *extra)
    assert resumed["first_step"] == saved
    assert resumed["losses"] == reference["losses"][saved:]


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("override, words", [
    ("lora_rank=-1", ["lora_rank=-1", ">= 0"]),
    ("lora_rank=33", ["lora_rank=33", "wk (32 x 64)", "pick a smaller lora_rank"]),
    ('lora_targets=["wq","wx"]', ["'wx'", "wq, wk, wv, wo, w1, w2, w3"]),
    ("lora_targets=wq", ["list of projection names"]),
    ("lora_alpha=0", ["lora_alpha"]),
    ("base_dtype=int8", ["base_dtype"]),
])
def test_bad_lora_settings_are_one_line_exit_1(corpus, tmp_path, override, words):
    """The first case runs the real command (a fresh interpreter); the others call its main()."""
    import train as train_script

    data_dir, _ = corpus
    out = tmp_path / "out"
    args = [*TINY_TRAIN, f"data={data_dir}", f"out_dir={out}", "lora_rank=4", override]
    proc = cli(*args, timeout=120) if override == "lora_rank=-1" else run_main(train_script.main, *args)
    assert proc.returncode == 1, proc.stderr[-1500:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert not out.exists()  # nothing written


def test_bf16_base_without_autocast_is_refused(corpus, tmp_path):
    from train import setup

    data_dir, _ = corpus
    with pytest.raises(lora.LoRAError, match="dtype=bfloat16"):
        setup(tiny_config(data_dir, tmp_path, "lora_rank=4", "base_dtype=bfloat16", "device=cpu"))


def test_lora_errors_are_user_errors():
    from llama.common.errors import UserError

    assert issubclass(lora.LoRAError, UserError)
    with pytest.raises(lora.LoRAError, match="model_parallel_size=8 > n_kv_heads=4"):
        lora.check_model(ModelArgs(**ARGS), 4, lora.TARGETS, mp=8)
    lora.check_model(ModelArgs(**ARGS), 4, ["wq", "wo", "w1", "w2", "w3"], mp=8)  # without wk/wv: fine
