"""llama/train/dpo.py and llama/data/pairs.py against TRL itself: the same pairs tokenized alike, and
the same DPO / IPO (TRL's DPOTrainer) and SimPO (TRL's CPOTrainer) losses, per-pair log-probabilities,
TRL's logged metrics and the gradients, on one small HF Llama's weights, full and with LoRA.

TRL's own code computes its side: DPOTrainer tokenizes the pairs with the model's chat template,
collates them and runs its `_compute_loss` (the per-token log-probabilities of its fused LM head);
its `compute_ref_log_probs` gives the per-pair log-probabilities; CPOTrainer's
`get_batch_loss_metrics` gives SimPO. DPOConfig defaults to bf16 autocast: it is turned off, so
both sides run fp32."""

import copy
import json
import warnings

import pytest
import torch

from llama import lora
from llama.checkpoint import peft as peft_io
from llama.checkpoint.hf import from_rotate_half, hf_name, save_hf, to_rotate_half
from llama.common import assets
from llama.data.prepare import prepare
from llama.model import ModelArgs, Transformer
from llama.train import dpo
from llama.train.batches import Batches

trl = pytest.importorskip("trl")
pytestmark = pytest.mark.slow  # ~15 CPU-seconds a test: TRL's trainers, a 49,152-word vocabulary
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=49152, hidden_dim=96, rope_theta=10000.0,
            norm_eps=1e-5, max_seq_len=128)
BETA, GAMMA = 0.1, 0.5

# Every form a pair may take: a string prompt, a dialog with a system message, TRL's conversational
# lists, a multi-turn prompt; replies of different lengths so that the batch is padded.
PAIRS = [
    {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5, I think."},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
     "chosen": "Paris.", "rejected": "Lyon, the capital of the Gauls."},
    {"prompt": [{"role": "user", "content": "Convert 3 km to metres."}],
     "chosen": [{"role": "assistant", "content": "3 km = 3000 m"}],
     "rejected": [{"role": "assistant", "content": "3 km = 300 m"}]},
    {"prompt": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
                {"role": "user", "content": "Name a prime number above 10."}],
     "chosen": "11 is prime.", "rejected": "12"},
]


def trl_form(pair: dict) -> dict:
    """The same pair in TRL's conversational form (prompt and replies as message lists)."""
    prompt = pair.get("prompt", pair.get("messages"))
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    reply = lambda r: r if isinstance(r, list) else [{"role": "assistant", "content": r}]  # noqa: E731
    return {"prompt": prompt, "chosen": reply(pair["chosen"]), "rejected": reply(pair["rejected"])}


@pytest.fixture(scope="module")
def oracle(tmp_path_factory, hf_smollm2_dir):
    """A small random base and a policy a little away from it (Meta layout here, HF files for TRL), the
    pairs prepared by `python -m llama.data prepare --pairs` with SmolLM2's tokenizer, one batch of them."""
    root = tmp_path_factory.mktemp("dpo")
    base = Transformer(ModelArgs(**ARGS))
    base.init_weights(3)
    policy = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    for name, model in (("base", base), ("policy", policy)):
        save_hf(model.state_dict(), model.params, root / name)
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    data = prepare([str(root / "pairs.jsonl")], root / "data", str(assets.smollm2_gguf()), pairs=True, val_fraction=0)
    x, y = Batches(data, 128, seed=0).micro_batch(range(len(PAIRS)), "train")
    return {"root": root, "base": base.eval(), "policy": policy.eval(), "data": data, "x": x, "y": y,
            "tokenizer": hf_smollm2_dir / "tokenizer"}


def hf_model(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                                 attn_implementation="eager")


def trl_dpo(oracle, kind: str, peft_config=None, sft_weight: float = 0.0):
    """TRL's DPOTrainer on the pairs: (trainer, its collated batch). Full fine-tuning: the policy's weights
    against the base's as ref_model; LoRA: the base with a fresh PEFT adapter (the reference: adapters off)."""
    from datasets import Dataset

    root = oracle["root"]
    losses = dict(loss_type=[kind, "sft"], loss_weights=[1.0, sft_weight]) if sft_weight else dict(loss_type=[kind])
    args = trl.DPOConfig(output_dir=str(root / f"trl-{kind}"), beta=BETA, bf16=False, use_cpu=True, report_to=[],
                         disable_dropout=True, max_length=None, per_device_train_batch_size=len(PAIRS), **losses)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(oracle["tokenizer"]))
    model = hf_model(root / ("base" if peft_config else "policy"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.DPOTrainer(model=model, ref_model=None if peft_config else hf_model(root / "base"), args=args,
                                 train_dataset=Dataset.from_list([trl_form(p) for p in PAIRS]),
                                 processing_class=tokenizer, peft_config=peft_config)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    return trainer, batch


def meta_grads(model) -> dict:
    """Our gradients under HF's names and HF's q/k row order (the layout TRL's model has)."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad
            if name.endswith(("attention.wq.weight", "attention.wk.weight")):
                g = to_rotate_half(g, model.params.head_dim)
            out[hf_name(name)] = g
    return out


def our_step(oracle, kind: str, policy, reference, sft_weight: float = 0.0):
    """Our loss, per-pair log-probabilities, TRL-named metrics and gradients on the prepared batch."""
    x, y = oracle["x"], oracle["y"]
    objective = dpo.Preference(kind, BETA, GAMMA, 1, reference, "", sft_weight)
    pairs = objective.count([(x, y)], torch.device("cpu"))
    loss = objective.loss_sum(policy, x, y) / pairs
    loss.backward()
    objective.finish_step(torch.tensor(float(len(PAIRS))))
    with torch.no_grad():
        logps = dpo.response_logps(policy, x, y)[0]
    return loss.item(), logps, objective.pop_metrics()


def test_pairs_tokenize_as_trl_does(oracle):
    """Prompt, chosen and rejected token ids of every pair equal those TRL's DPOTrainer makes with the
    model's chat template (SmolLM2's ChatML, its default system message where a dialog has none)."""
    trainer, _ = trl_dpo(oracle, "sigmoid")
    batches = Batches(oracle["data"], 128, seed=0)
    for i in range(len(PAIRS)):
        ours = [t.tolist() for t, _ in batches._item(i, "train")]
        masks = [m.tolist() for _, m in batches._item(i, "train")]
        theirs = trainer.train_dataset[i]
        n = len(theirs["prompt_ids"])
        assert ours[0] == theirs["prompt_ids"] + theirs["chosen_ids"]
        assert ours[1] == theirs["prompt_ids"] + theirs["rejected_ids"]
        assert masks[0] == [0] * n + [1] * len(theirs["chosen_ids"])
        assert masks[1] == [0] * n + [1] * len(theirs["rejected_ids"])


@pytest.mark.parametrize("kind,sft_weight", [("sigmoid", 0.0), ("ipo", 0.0), ("sigmoid", 0.5)],
                         ids=["dpo", "ipo", "dpo+sft"])
def test_dpo_and_ipo_equal_trl_full_weights(oracle, kind, sft_weight):
    """DPO, IPO, and DPO plus the chosen replies' NLL (RPO: TRL's loss_type ["sigmoid", "sft"])."""
    trainer, batch = trl_dpo(oracle, kind, sft_weight=sft_weight)
    trainer.model.train()
    theirs = trainer._compute_loss(trainer.model, batch, False)
    theirs.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    with torch.no_grad():
        their_policy = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))
        their_ref = torch.cat(trainer.compute_ref_log_probs(trainer.ref_model, batch))

    policy, base = copy.deepcopy(oracle["policy"]), oracle["base"]
    reference = lambda x, y: dpo.response_logps(base, x, y)[0]  # noqa: E731
    loss, logps, ours = our_step(oracle, kind, policy, reference, sft_weight)
    with torch.no_grad():
        ref_logps = reference(oracle["x"], oracle["y"])

    assert loss == pytest.approx(theirs.item(), rel=1e-6, abs=1e-5)
    torch.testing.assert_close(logps, their_policy, atol=1e-5, rtol=0)  # per pair: chosen rows, then rejected
    torch.testing.assert_close(ref_logps, their_ref, atol=1e-5, rtol=0)
    for name in dpo.NAMES + ["rewards/margins"]:
        assert ours[name] == pytest.approx(metrics[name], abs=1e-5), name
    grads = meta_grads(policy)
    their_grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
    assert grads.keys() == their_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, their_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_dpo_with_lora_equals_trl_peft(oracle):
    """LoRA: TRL's reference is the PEFT model with its adapter disabled, ours lora.disabled; the same
    adapter (random B, so the policy differs from the reference) in both."""
    targets = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(peft_io.HF_MODULES.values()))
    trainer, batch = trl_dpo(oracle, "sigmoid", peft_config=config)
    policy = copy.deepcopy(oracle["base"])
    lora.add_lora(policy, 4, 8.0, 0.0, targets, seed=5)
    lora.freeze_base(policy)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    peft_io.save_peft(oracle["root"] / "adapter", lora.adapter_state(policy), policy.params, 4, 8.0, 0.0, targets,
                      {"path": None})
    from safetensors.torch import load_file

    peft.set_peft_model_state_dict(trainer.model, load_file(oracle["root"] / "adapter/adapter_model.safetensors"))
    trainer.model.train()
    theirs = trainer._compute_loss(trainer.model, batch, False)
    theirs.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    with torch.no_grad():
        their_ref = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))  # adapters off

    def reference(x, y):
        with lora.disabled(policy):
            return dpo.response_logps(policy, x, y)[0]

    loss, _, ours = our_step(oracle, "sigmoid", policy, reference)
    with torch.no_grad():
        torch.testing.assert_close(reference(oracle["x"], oracle["y"]), their_ref, atol=1e-5, rtol=0)
    assert loss == pytest.approx(theirs.item(), rel=1e-6, abs=1e-5)
    for name in dpo.NAMES + ["rewards/margins"]:
        assert ours[name] == pytest.approx(metrics[name], abs=1e-5), name
    assert abs(ours["rewards/margins"]) > 1e-4  # the adapter moved the policy: a real comparison
    their_grads = {}
    for name, p in trainer.model.named_parameters():
        if p.grad is not None:
            ours_name = peft_io.lora_key(name.replace(".default.", "."))
            g = p.grad
            if ".lora_B." in ours_name and ours_name.split(".")[3] in ("wq", "wk"):
                g = from_rotate_half(g, policy.params.head_dim)
            their_grads[ours_name] = g
    grads = {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}
    assert grads.keys() == their_grads.keys() and len(grads) == 2 * 7 * ARGS["n_layers"]
    for name, g in grads.items():
        torch.testing.assert_close(g, their_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("sft_weight", [0.0, 0.5], ids=["simpo", "simpo+nll"])
def test_simpo_equals_trl_cpo(oracle, sft_weight):
    """SimPO (reference-free) against TRL's CPOTrainer with loss_type="simpo" (cpo_alpha=0: pure SimPO;
    cpo_alpha > 0 adds the chosen replies' NLL, as dpo_sft_weight does): its get_batch_loss_metrics on
    the same token ids, in its own batch layout."""
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    _, batch = trl_dpo(oracle, "sigmoid")  # TRL's collated ids, completion masks
    root = oracle["root"]
    args = CPOConfig(output_dir=str(root / "cpo"), loss_type="simpo", cpo_alpha=sft_weight, beta=BETA, simpo_gamma=GAMMA,
                     bf16=False, use_cpu=True, report_to=[], max_length=256)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(oracle["tokenizer"]))
    model = hf_model(root / "policy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = CPOTrainer(model=model, args=args, processing_class=tokenizer,
                             train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    P = len(PAIRS)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    cpo_batch = {}
    for side, rows in (("chosen", slice(0, P)), ("rejected", slice(P, 2 * P))):
        cpo_batch.update({f"{side}_input_ids": batch["input_ids"][rows], f"{side}_labels": labels[rows],
                          f"{side}_attention_mask": batch["attention_mask"][rows]})
    theirs, metrics = trainer.get_batch_loss_metrics(trainer.model.train(), cpo_batch)
    theirs.backward()

    policy = copy.deepcopy(oracle["policy"])
    loss, _, ours = our_step(oracle, "simpo", policy, None, sft_weight)
    assert loss == pytest.approx(theirs.item(), rel=1e-6, abs=1e-5)
    for name in dpo.NAMES + ["rewards/margins"]:
        assert ours[name] == pytest.approx(metrics[name], abs=1e-5), name
    their_grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
    for name, g in meta_grads(policy).items():
        torch.testing.assert_close(g, their_grads[name], atol=1e-5, rtol=1e-4, msg=name)

