"""DPO in the training run (train.py objective="dpo"): the first step against the reference, training
that moves the margins, LoRA checkpoints that are PEFT adapters, exact resume, MP2 x DP2 equal to
one process; bad preference data as one line each, nothing written. The math itself is checked
against TRL in tests/test_dpo.py."""

import json
import math
import random

import pytest
import torch

import train as train_script
from llama.checkpoint import save_meta
from llama.common import assets
from llama.data.prepare import DataError, main as data_main, prepare
from llama.model import ModelArgs, Transformer
from llama.train import dpo
from llama.train.batches import Batches
from llama.train.config import load_config
from tests.helpers import read_metrics, run_distributed, run_main

ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=49152, hidden_dim=96, rope_theta=10000.0)


def arithmetic_pairs(n: int, seed: int = 0):
    r = random.Random(seed)
    pairs = []
    for _ in range(n):
        a, b = r.randint(10, 99), r.randint(10, 99)
        pairs.append({"prompt": f"What is {a} + {b}?", "chosen": f"{a + b}", "rejected": f"{a + b + r.choice([-10, 1, 10])}"})
    return pairs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(base checkpoint, prepared pairs) for the runs: a small random model in Meta's layout and 24
    arithmetic pairs (18 to train on) in SmolLM2's chat format, its tokenizer the model's vocabulary."""
    root = tmp_path_factory.mktemp("dpo-train")
    model = Transformer(ModelArgs(**ARGS))
    model.init_weights(2)
    save_meta(model.state_dict(), model.params, root / "base")
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in arithmetic_pairs(24)))
    data = prepare([str(root / "pairs.jsonl")], root / "data", str(assets.smollm2_gguf()), pairs=True,
                   val_fraction=0.25)
    return root / "base", data


@pytest.fixture(scope="module")
def four_pairs(setup, tmp_path_factory):
    """The same base with 4 training pairs (and 2 held out): every step's batch is the whole training set."""
    root = tmp_path_factory.mktemp("dpo-four")
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in arithmetic_pairs(6, seed=1)))
    return setup[0], prepare([str(root / "pairs.jsonl")], root / "data", str(assets.smollm2_gguf()), pairs=True,
                             val_fraction=0.3)


def run(setup, out_dir, *overrides):
    base, data = setup
    keys = [f"init_from={base}", f"data={data}", f"out_dir={out_dir}", "objective=dpo", "seq_len=48",
            "batch_size=4", "micro_batch_size=2", "lr=2e-3", "min_lr=2e-4", "warmup_steps=0", "weight_decay=0.0",
            "log_every=1", "eval_every=3", "eval_batches=1", "save_every=0", "max_steps=6", *overrides]
    return train_script.train(load_config(None, keys))


LORA = ["lora_rank=4", "lora_alpha=8.0", "lr=3e-2"]


@pytest.mark.parametrize("variant", [[], pytest.param(LORA, marks=pytest.mark.slow),
                                     pytest.param(["dpo_loss=ipo"], marks=pytest.mark.slow)], ids=["full", "lora", "ipo"])
def test_first_step_is_the_reference_and_training_separates_the_pairs(four_pairs, tmp_path, variant):
    """At step 1 the policy is its reference: every reward is 0 and the DPO loss is log 2 (IPO's:
    (1 / (2 beta))^2). Trained on the same 4 pairs at every step, the chosen replies' rewards rise
    above the rejected ones' on all of them. LoRA's checkpoints are PEFT adapters."""
    result = run(four_pairs, tmp_path, *variant)
    records = read_metrics(tmp_path)
    first, last = records[0], records[-1]
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0.0
    ipo = "dpo_loss=ipo" in variant
    assert first["loss"] == pytest.approx((1 / (2 * 0.1)) ** 2 if ipo else math.log(2), abs=1e-6)
    assert last["rewards/accuracies"] == 1.0 and last["rewards/margins"] > 0.05 and last["loss"] < first["loss"]
    assert "eval_rewards/accuracies" in records[2] and "val_loss" in records[2]
    for r in records:
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-6)
    if variant == LORA:
        peft = pytest.importorskip("peft")
        assert peft.PeftConfig.from_pretrained(result["checkpoint"]).r == 4
        assert not list((tmp_path / "step_000006").glob("consolidated.*"))


@pytest.mark.slow
def test_simpo_needs_no_reference(setup, tmp_path, capsys):
    run(setup, tmp_path, "dpo_loss=simpo", "max_steps=2", "simpo_gamma=0.5")
    assert "reference: none (SimPO is reference-free)" in capsys.readouterr().out
    first = read_metrics(tmp_path)[0]
    # SimPO's rewards are beta times the average log-probabilities, nonzero from the start
    assert first["rewards/chosen"] == pytest.approx(0.1 * first["logps/chosen"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [[], LORA], ids=["full", "lora"])
def test_resume_is_exact(setup, tmp_path, variant):
    """Stopped after step 3 and resumed: steps 4-6 and the final weights as in one run (full fine-tuning
    rebuilds its frozen reference from init_from; LoRA's is the base with the adapters off)."""
    whole = run(setup, tmp_path / "whole", "save_every=3", "decay_steps=6", *variant)
    run(setup, tmp_path / "split", "save_every=3", "decay_steps=6", "max_steps=3", *variant)
    resumed = train_script.train(load_config(None, [f"out_dir={tmp_path / 'split'}", "resume=true", "max_steps=6"]))
    assert resumed["first_step"] == 3 and resumed["losses"] == whole["losses"][3:]  # bit for bit on CPU
    assert [strip(r) for r in read_metrics(tmp_path / "split")] == [strip(r) for r in read_metrics(tmp_path / "whole")]
    name = "adapter.00.pth" if variant else "consolidated.00.pth"
    a = torch.load(tmp_path / "whole/step_000006" / name, weights_only=True)
    b = torch.load(tmp_path / "split/step_000006" / name, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


TIMING = ("tokens_per_s", "tflops", "mfu", "memory_gb")
PER_PROCESS = TIMING  # the over-fitting warning's history is saved with the checkpoint: it is compared


def strip(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in PER_PROCESS}


def dpo_worker(setup, out_dir, overrides):
    return run(setup, out_dir, *overrides)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [["data_parallel=fsdp"], LORA + ["dpo_sft_weight=1.0"]],
                         ids=["full-fsdp", "lora-ddp-sft"])
def test_mp2_dp2_equals_one_process(setup, tmp_path, variant):
    """4 processes (gloo): model parallel 2 (vocabulary-parallel log-probabilities) x data parallel 2
    (FSDP for full fine-tuning with its sharded reference copy; DDP for LoRA, with the chosen replies'
    NLL averaged over the global batch's tokens), each rank one micro-batch of the 4 pairs against one
    process accumulating two: the same losses, TRL metrics and gradient norms."""
    run(setup, tmp_path / "one", *variant)
    run_distributed(dpo_worker, 4, setup, tmp_path / "four", ["model_parallel_size=2", *variant])
    one, many = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "four")
    assert len(one) == len(many) == 6
    for a, b in zip(one, many):
        a, b = strip(a), strip(b)
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (a["step"], key)


def test_held_out_padding_pairs_weigh_nothing(setup):
    """A data-parallel rank short of held-out pairs runs a padding pair (every rank joins each FSDP
    forward): it is no pair in the count and adds no loss and no statistics."""
    batches = Batches(setup[1], 48, seed=0)
    short = batches.val_micro_batches(1, 5, 2, dp_rank=1, dp=2)  # 5 held-out pairs over 2 ranks: rank 1 has 2
    assert len(short) == len(batches.val_micro_batches(1, 5, 2, dp_rank=0, dp=2)) == 2
    assert short[1][0].shape[0] == 2 and dpo.real_pairs(short[1][1]) == 0 and dpo.real_pairs(short[0][1]) == 2
    logps, ref = torch.tensor([-3.0, 0.0, -5.0, 0.0]), torch.tensor([-3.5, 0.0, -4.0, 0.0])  # pair 1 is padding
    counts = torch.tensor([4, 0, 6, 0])
    for kind in ("sigmoid", "ipo", "simpo"):
        losses, stats = dpo.preference_loss(kind, 0.1, 0.5, logps, counts, ref)
        assert losses[0] > 0 and losses[1] == 0 and (stats[:, 1] == 0).all() and stats[3, 0] != 0, kind


# ---------------------------------------------------------------- bad preference data


BAD = [
    ({"prompt": "Hi", "chosen": "Hello.", "rejected": "Hello. "}, "'chosen' and 'rejected' are the same reply"),
    ({"prompt": "Hi", "chosen": "Hello.", "rejected": "  "}, "'rejected' is empty"),
    ({"prompt": "Hi", "chosen": [], "rejected": "No."}, "'chosen' must be a string"),
    ({"prompt": "Hi", "answer": "Hello."}, "has no 'chosen' field"),
    ({"question": "Hi", "chosen": "a", "rejected": "b"}, "has neither of 'prompt' and 'messages'"),
    ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "each message needs a string 'role' and 'content'"),
    ({"prompt": [{"role": "usr", "content": "Hi"}], "chosen": "a", "rejected": "b"}, "role 'usr' is not a chat role"),
]


@pytest.mark.parametrize("record,message", BAD, ids=[m.split("'")[1] if "'" in m else m[:12] for _, m in BAD])
def test_bad_pairs_are_one_line_and_write_nothing(tmp_path, record, message):
    good = {"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3"}
    (tmp_path / "prefs.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    res = run_main(data_main, "prepare", tmp_path / "prefs.jsonl", "--pairs", "--tokenizer", "smollm2",
                   "--out", tmp_path / "out")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'prefs.jsonl'}:2") and message in lines[0], \
        res.stderr
    assert not (tmp_path / "out").exists()


def test_pairs_longer_than_seq_len_are_named_before_training(setup, tmp_path):
    base, data = setup
    with pytest.raises(DataError, match=r"pairs\.jsonl:\d+: its prompt alone is \d+ tokens\): raise seq_len to"):
        run((base, data), tmp_path, "seq_len=16")
    with pytest.raises(DataError, match=r"do not fit seq_len=42 .*pairs\.jsonl:\d+: prompt and response are 4\d tokens"):
        run((base, data), tmp_path, "seq_len=42")
    assert not (tmp_path / "latest").exists()


def test_dpo_needs_pair_data(setup, tmp_path, corpus):
    base, data = setup
    with pytest.raises(DataError, match="prepared for pretrain: prepare preference pairs with --pairs"):
        run((base, corpus[0]), tmp_path)
    with pytest.raises(DataError, match='holds preference pairs: train it with objective="dpo"'):
        train_script.train(load_config(None, [f"init_from={base}", f"data={data}", f"out_dir={tmp_path}"]))


@pytest.mark.parametrize("layout", [["packing=true"], ["context_parallel_size=2"]], ids=["packing", "cp2"])
def test_dpo_refuses_packing_and_context_parallelism(setup, tmp_path, layout):
    from llama.train.config import ConfigError

    with pytest.raises(ConfigError, match=r'objective="dpo" reads each pair as two whole rows: set packing=false'):
        run(setup, tmp_path, *layout)
    assert not (tmp_path / "latest").exists()


def test_a_pairs_line_that_is_not_utf8_is_named(tmp_path):
    good = json.dumps({"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3"}).encode() + b"\n"
    (tmp_path / "prefs.jsonl").write_bytes(good + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    res = run_main(data_main, "prepare", tmp_path / "prefs.jsonl", "--pairs", "--tokenizer", "smollm2",
                   "--out", tmp_path / "out")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip() == f"error: {tmp_path / 'prefs.jsonl'}:2 is not UTF-8 text (byte 0xe9): convert the file to UTF-8"
    assert not (tmp_path / "out").exists()
