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


def test_adapters_are_layers_in_the_tree_with_meta_and_peft_keys():
    """Each target is a LoRALinear in its projection's place (print(model) shows it), holding the base's
    own weight: the state-dict keys are Meta's plus PEFT's, nothing else; merging puts plain layers back."""
    base_keys = set(tiny_model(rank=0).state_dict())
    model = tiny_model()
    wq = model.layers[1].attention.wq
    assert isinstance(wq, lora.LoRALinear) and "LoRALinear" in repr(model) and "LoRADropout" in repr(model)
    adapter_keys = {f"layers.{i}.{m}.lora_{p}.weight" for i in range(2) for m in lora.MODULES.values() for p in "AB"}
    assert set(model.state_dict()) == base_keys | adapter_keys
    weight = wq.weight
    lora.merge_lora(model)
    assert type(model.layers[1].attention.wq) is torch.nn.Linear and model.layers[1].attention.wq.weight is weight
    assert not list(lora.lora_modules(model)) and set(model.state_dict()) == base_keys
    with pytest.raises(lora.LoRAError, match="already has an adapter"):
        lora.add_lora(tiny_model(), 4, 8.0)


def test_quantizing_an_unmerged_model_is_refused_and_the_merged_one_quantizes():
    """quantize_model replaces linear layers: on unmerged adapters it would quantize A and B as layers and
    drop the LoRA term, so it refuses in one line; merged first, it quantizes with the adapter in W."""
    from llama.generation.quantize import quantize_model

    model = tiny_model()
    with torch.no_grad():
        expected = model(tokens())
    with pytest.raises(lora.LoRAError, match=r"quantizing to int8: .*unmerged LoRA adapters \(layers.0.attention.wq "
                                             r"and 13 more\): merge them first") as e:
        quantize_model(model, "int8", 0)
    assert "\n" not in str(e.value)
    assert isinstance(model.layers[0].attention.wq, lora.LoRALinear)  # nothing changed
    lora.merge_lora(model)
    quantize_model(model, "int8", 0)
    with torch.no_grad():
        got = model(tokens())
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()  # int8 per-row: close, not equal


# ---------------------------------------------------------------------------- dropout


def dropout(p, x, rows, seed=5, salt=11, offset=0, train=True, width=96, length=32):
    module = lora.LoRADropout(p, salt, width, offset).train(train)
    with lora.dropout_rows(torch.nn.Sequential(module), rows, seed, length):
        return module(x)


def test_lora_dropout_draws_one_mask_whatever_the_layout():
    """Each row's mask is drawn whole from its place in the run (row number, seed) and the projection:
    a row-parallel rank's slice of the features, a micro-batch's slice of the rows and a shorter
    (padded) batch's positions get exactly their slice of the one-process mask; it drops p of the
    inputs and scales the rest as nn.Dropout does."""
    x = torch.randn(4, 32, 96)
    full = dropout(0.3, x, range(10, 14))
    kept = full != 0
    assert abs(1 - kept.float().mean().item() - 0.3) < 0.01
    torch.testing.assert_close(full[kept], x[kept] / 0.7)
    for rank in range(2):  # model parallel 2: features [48 rank, 48 (rank + 1)) of the same mask
        part = slice(48 * rank, 48 * (rank + 1))
        assert torch.equal(dropout(0.3, x[..., part], range(10, 14), offset=48 * rank), full[..., part])
    for rows in (range(10, 12), range(12, 14)):  # data parallel / micro-batches: their rows of the batch
        assert torch.equal(dropout(0.3, x[rows.start - 10:rows.stop - 10], rows), full[rows.start - 10:rows.stop - 10])
    assert torch.equal(dropout(0.3, x[:, :20], range(10, 14)), full[:, :20])  # padded to 20 of seq_len 32
    for other in (dict(rows=range(14, 18)), dict(rows=range(10, 14), seed=6), dict(rows=range(10, 14), salt=12)):
        assert ((dropout(0.3, x, **other) != 0) != kept).float().mean() > 0.3  # another row, seed or projection
    assert torch.equal(dropout(0.3, x, range(4), train=False), x)


def test_lora_dropout_without_row_keys_draws_from_torchs_generator():
    """Another training loop (no dropout_rows): every forward draws fresh row keys from torch's
    generator, so the masks change from step to step and a reseeded generator repeats them."""
    module, x = lora.LoRADropout(0.5, 11, 16), torch.ones(2, 8, 16)
    torch.manual_seed(0)
    first, second = module(x), module(x)
    torch.manual_seed(0)
    assert not torch.equal(first, second) and torch.equal(module(x), first)


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
        loss = loss_sum(model, inputs, targets, chunks)
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
    """4 gloo ranks, MP 2 x DP 2, recomputed blocks, chunked loss head, LoRA dropout: the same losses as one
    plain process (each data-parallel rank draws its rows' masks of the global batch, each model-parallel
    rank its slice of the features, and the recomputation the forward's)."""
    from tests.helpers import train_worker

    data_dir, _ = corpus
    single = train(data_dir, tmp_path / "one", "max_steps=3", "lora_dropout=0.05")
    assert single["losses"][1:] != train(data_dir, tmp_path / "nodrop", "max_steps=3")["losses"][1:]  # it drops
    lora_args = ["lora_rank=4", "lora_alpha=8.0", "lr=1e-2", "max_steps=3", "model_parallel_size=2",
                 "activation_checkpointing=true", "loss_chunks=2", "lora_dropout=0.05"]
    results = run_distributed(train_worker, 4, data_dir, tmp_path / "four", lora_args)
    for res in results:
        torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(single["losses"]), atol=2e-5, rtol=1e-5)
    assert (tmp_path / "four/step_000003/adapter.01.pth").is_file()


@pytest.mark.slow
def test_lora_dropout_under_model_parallel_matches_one_process(corpus, tmp_path):
    """MP 2 with lora_dropout=0.05 (a row-parallel rank drops its slice of one process's mask, not a
    copy of the other half's): one process's losses within 1e-5, micro-batches of 2 against 4."""
    from tests.helpers import train_worker

    data_dir, _ = corpus
    single = train(data_dir, tmp_path / "one", "max_steps=3", "lora_dropout=0.05")
    args = ["lora_rank=4", "lora_alpha=8.0", "lr=1e-2", "max_steps=3", "lora_dropout=0.05", "model_parallel_size=2",
            "micro_batch_size=2"]
    for res in run_distributed(train_worker, 2, data_dir, tmp_path / "two", args):
        torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(single["losses"]), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_lora_training_step_matches_eager():
    """torch.compile traces LoRALinear (aot_eager: Dynamo + AOTAutograd; the dropout's mask is drawn
    eagerly between graphs): the loss and every adapter gradient equal eager's, and new rows reuse the
    graphs (nothing recompiles)."""
    from torch._dynamo.utils import counters

    model = Transformer(ModelArgs(**{**ARGS, "n_layers": 1}))  # one block: compiling is the slow part
    model.init_weights(seed=7)
    lora.add_lora(model, 4, 8.0, dropout=0.1, seed=7)
    randomize_b(model)
    lora.freeze_base(model)
    compiled = torch.compile(model, backend="aot_eager")

    def step(forward, rows):
        model.zero_grad()
        with lora.dropout_rows(model, rows, seed=1, length=32):
            loss = F.cross_entropy(forward(tokens()[:, :-1]).flatten(0, 1), tokens()[:, 1:].flatten())
            loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in lora.trainable_parameters(model).items()}

    torch._dynamo.reset()
    losses, graphs = set(), []
    for rows in ([0, 1], [2, 3]):
        (eager, eager_grads), (traced, traced_grads) = step(model, rows), step(compiled, rows)
        torch.testing.assert_close(traced, eager, atol=1e-6, rtol=1e-6)
        for name in eager_grads:
            torch.testing.assert_close(traced_grads[name], eager_grads[name], atol=1e-6, rtol=1e-5, msg=name)
        losses.add(eager.item())
        graphs.append(counters["stats"]["unique_graphs"])
    assert len(losses) == 2 and graphs[0] > 0 and graphs[1] == graphs[0]


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
