"""LoRA x FSDP (llama/train/adapters.py, llama/train/fsdp.py): adapters attached before fully_shard, the
frozen base sharded with them, the optimizer over the adapters only, adapter-only checkpoints with
the AdamW state in DCP, and FSDP x model parallel against one process."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from llama import checkpoint, lora, parallel
from llama.train import fsdp
from llama.train.config import load_config
from tests.helpers import run_distributed, tiny_config, tiny_corpus
from tests.test_lora import tiny_model, tokens, train

TOL = 1e-5
RUN = ["decay_steps=4", "micro_batch_size=2", "save_every=2"]  # accumulation: 2 micro-batches per step


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_corpus(tmp_path_factory.mktemp("corpus"))


def moments(optimizer) -> int:
    """AdamW's exp_avg + exp_avg_sq entries held by this rank (its FSDP pieces)."""
    return sum(fsdp.local(s[k]).numel() for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq"))


def test_one_process_lora_fsdp_saves_the_optimizer_with_dcp_and_resumes_exactly(corpus, tmp_path):
    """No process group to shard over: the checkpoint holds the adapters, the PEFT pair and the
    adapters' AdamW state as a DCP directory (no base weights); stop + resume is exact."""
    load_config(None, ["lora_rank=8", "data_parallel=fsdp"])  # composed now: no refusal
    data_dir, _ = corpus
    run = ["decay_steps=4", "save_every=2", "data_parallel=fsdp"]  # fewer steps than RUN: a fast test
    full = train(data_dir, tmp_path / "full", *run, "max_steps=3")
    train(data_dir, tmp_path / "split", *run, "max_steps=2")
    resumed = train(data_dir, tmp_path / "split", *run, "max_steps=3", "resume=true")
    assert resumed["first_step"] == 2 and resumed["losses"] == full["losses"][2:]
    ckpt = tmp_path / "full/step_000003"
    assert fsdp.is_fsdp_checkpoint(ckpt) and (ckpt / "adapter_model.safetensors").is_file()
    assert not list(ckpt.glob("consolidated.*"))
    assert "optimizer" not in torch.load(ckpt / "train_state.00.pth", weights_only=True)
    adapter = torch.load(ckpt / "adapter.00.pth", weights_only=True)
    assert saved_moments(ckpt / "optimizer.00", tmp_path) == 2 * sum(t.numel() for t in adapter.values())


def saved_moments(dcp_dir, tmp_path) -> int:
    """exp_avg + exp_avg_sq entries in a DCP optimizer directory; every entry must be an adapter's."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(dcp_dir, tmp_path / "optimizer.pt")
    state = torch.load(tmp_path / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    assert state and all(lora.is_lora_name(name) for name in state), sorted(state)[:3]
    return sum(s[k].numel() for s in state.values() for k in ("exp_avg", "exp_avg_sq"))


# ---------------------------------------------------------------------------- processes (slow)


def step_worker(mp: int):
    """One rank of FSDP (x MP): this data-parallel rank's sequence, backward, one AdamW step."""
    from llama.train.loop import make_optimizer

    parallel.init_distributed(mp)
    model = tiny_model()  # LoRA r=4 on all seven projections, B random (A gets a gradient too)
    lora.freeze_base(model)
    fsdp.shard_model(model, torch.device("cpu"))
    dp, d = parallel.data_parallel_size(), parallel.data_parallel_rank()
    sharded = all(isinstance(p, DTensor) for p in model.parameters())  # the frozen base too
    optimizer = make_optimizer(model, tiny_config("stdlib", "unused"), torch.device("cpu"))
    lora.check_only_adapters_train(model, optimizer)
    x = tokens()[d::dp]  # (1, 24): each data-parallel rank gets one of the two sequences
    logits = model(x[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()  # FSDP averages over dp

    def whole(name, t):  # all-gather over data parallel (FSDP), then over model parallel
        return parallel.gather(name, t.full_tensor() if isinstance(t, DTensor) else t)

    grads = {n: whole(n, p.grad) for n, p in lora.trainable_parameters(model).items()}
    base_grads = [n for n, p in model.named_parameters() if p.grad is not None and not lora.is_lora_name(n)]
    optimizer.step()
    after = {n: whole(n, p.detach()) for n, p in lora.trainable_parameters(model).items()}
    trainable = sum(fsdp.local(p).numel() for p in lora.trainable_parameters(model).values())
    return {"dp_rank": d, "mp_rank": parallel.model_parallel_rank(), "logits": logits.detach(), "grads": grads,
            "base_grads": base_grads, "after": after, "sharded": sharded, "moments": moments(optimizer),
            "trainable": trainable}


@pytest.mark.slow
@pytest.mark.parametrize("world, mp", [(2, 1), (4, 2)], ids=["fsdp2", "fsdp2xmp2"])
def test_fsdp_logits_adapter_grads_and_optimizer_match_one_process(world, mp):
    """FSDP (dp=2) and FSDP x MP (dp=2, mp=2), LoRA on all seven projections: logits, every adapter
    gradient and the adapters after one AdamW step equal one process within 1e-5; the base is
    sharded, gets no gradient and no optimizer state; the ranks' moments add up to exactly
    2 x the trainable count of each model-parallel rank."""
    from llama.train.loop import make_optimizer

    model = tiny_model()
    lora.freeze_base(model)
    optimizer = make_optimizer(model, tiny_config("stdlib", "unused"), torch.device("cpu"))
    logits = model(tokens()[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), tokens()[:, 1:].flatten()).backward()
    grads = {n: p.grad.clone() for n, p in lora.trainable_parameters(model).items()}
    optimizer.step()
    results = run_distributed(step_worker, world, mp)
    for res in results:
        where = f"dp rank {res['dp_rank']} mp rank {res['mp_rank']}"
        assert res["sharded"] and res["base_grads"] == [], where
        torch.testing.assert_close(res["logits"], logits[res["dp_rank"]:res["dp_rank"] + 1], atol=TOL, rtol=TOL)
        assert res["grads"].keys() == grads.keys()
        for name, p in lora.trainable_parameters(model).items():
            torch.testing.assert_close(res["grads"][name], grads[name], atol=TOL, rtol=TOL, msg=f"{name} {where}")
            torch.testing.assert_close(res["after"][name], p.detach(), atol=TOL, rtol=TOL, msg=f"{name} {where}")
    per_mp_rank = lora.count_lora_parameters(model.params, 4, mp=mp)
    for m in range(mp):
        ranks = [r for r in results if r["mp_rank"] == m]
        assert sum(r["trainable"] for r in ranks) == per_mp_rank
        assert sum(r["moments"] for r in ranks) == 2 * per_mp_rank
        assert all(0 < r["moments"] < 2 * per_mp_rank for r in ranks)  # sharded: each holds a piece


def fsdp_runs_worker(data_dir, root, extra):
    """One rank of an FSDP run: 4 steps straight, and 2 steps then resume to 4."""
    layout = [*RUN, "data_parallel=fsdp", *extra]
    full = train(data_dir, root / "full", *layout, "max_steps=4")
    train(data_dir, root / "split", *layout, "max_steps=2")
    resumed = train(data_dir, root / "split", *layout, "max_steps=4", "resume=true")
    return {"full": full["losses"], "resumed": resumed["losses"], "first_step": resumed["first_step"]}


@pytest.mark.slow
def test_fsdp_x_mp_lora_run_checkpoints_adapters_that_peft_loads_and_resumes_exactly(corpus, tmp_path):
    """4 gloo ranks, MP=2 x FSDP=2, accumulation: one process's losses; the checkpoint is adapters
    only (per model-parallel rank) + the PEFT pair + the adapters' AdamW state in DCP; `peft` applies
    it to the HF export of the base and gives the logits of one process's trained adapter; stop and
    resume continues the uninterrupted curve exactly."""
    from tests.test_peft import hf_with_adapter
    from llama.train.setup import build_model, model_args

    data_dir, _ = corpus
    single = train(data_dir, tmp_path / "one", *RUN, "max_steps=4")
    results = run_distributed(fsdp_runs_worker, 4, data_dir, tmp_path, ["model_parallel_size=2"])
    for res in results:
        torch.testing.assert_close(torch.tensor(res["full"]), torch.tensor(single["losses"]), atol=2e-5, rtol=TOL)
        assert res["first_step"] == 2 and res["resumed"] == res["full"][2:]
    ckpt = tmp_path / "full/step_000004"
    assert {"adapter.00.pth", "adapter.01.pth", "optimizer.00", "optimizer.01", "adapter_config.json",
            "adapter_model.safetensors", "lora.json"} <= {p.name for p in ckpt.iterdir()}
    assert not list(ckpt.glob("consolidated.*"))
    for m in range(2):
        assert "optimizer" not in torch.load(ckpt / f"train_state.{m:02d}.pth", weights_only=True)
        adapter = torch.load(ckpt / f"adapter.{m:02d}.pth", weights_only=True)
        assert saved_moments(ckpt / f"optimizer.{m:02d}", tmp_path) == 2 * sum(t.numel() for t in adapter.values())
    from safetensors.torch import load_file

    ours, theirs = (load_file(d / "adapter_model.safetensors") for d in (tmp_path / "one/step_000004", ckpt))
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(theirs[key], ours[key], atol=TOL, rtol=TOL, msg=key)
    # peft on the HF export of the (seeded) base, with the FSDP run's directory as it is
    cfg = tiny_config(data_dir, tmp_path / "one")
    base = build_model(cfg, model_args(cfg), torch.device("cpu"))
    checkpoint.save_hf(base.state_dict(), base.params, tmp_path / "hf")
    lora.add_lora(base, 4, 8.0)
    base.load_state_dict(torch.load(tmp_path / "one/step_000004/adapter.00.pth", weights_only=True), strict=False)
    x = torch.randint(0, base.params.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(hf_with_adapter(tmp_path / "hf", ckpt)(x).logits, base(x), atol=TOL, rtol=TOL)


@pytest.mark.slow
def test_bf16_base_and_fp32_adapters_share_fsdp_units(corpus, tmp_path):
    """base_dtype=bfloat16 (what CUDA runs use) under FSDP=2: the frozen bf16 base and the fp32 adapters
    sit in the same fully_shard unit (FSDP2 wants one dtype among the trainable parameters only),
    all-gathered in bf16; it trains like fp32 and resumes exactly. (bf16 autocast on the CPU here.)"""
    data_dir, _ = corpus
    single = train(data_dir, tmp_path / "one", *RUN, "max_steps=4")
    res = run_distributed(fsdp_runs_worker, 2, data_dir, tmp_path, ["base_dtype=bfloat16", "dtype=bfloat16"])[0]
    assert res["full"] == pytest.approx(single["losses"], abs=0.02)
    assert res["first_step"] == 2 and res["resumed"] == res["full"][2:]
    adapter = torch.load(tmp_path / "full/step_000004/adapter.00.pth", weights_only=True)
    assert {t.dtype for t in adapter.values()} == {torch.float32}  # the master adapters stay fp32
