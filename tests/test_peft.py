"""PEFT's adapter format (llama/checkpoint/peft.py) against HF `peft` itself, merging through convert,
Llama.build and generate.py (also under model parallel), and bad adapters."""

import json
import shutil
import warnings

import pytest
import torch

from llama import checkpoint, lora, parallel
from llama.checkpoint import peft as peft_io
from llama.checkpoint.convert import main as convert_main
from llama.model import ModelArgs, Transformer
from llama.train.config import load_config
from tests.helpers import run_distributed
from tests.test_lora import ARGS, randomize_b, tiny_model, tokens
from tests.helpers import TINY_TRAIN, tiny_corpus

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def export(model, out, base_path=None):
    cfg = model.lora
    peft_io.save_peft(out, peft_io.export_training_adapter(lora.adapter_state(model)), model.params, cfg["rank"], cfg["alpha"],
                      cfg["dropout"], cfg["targets"],
                      {"path": base_path, "params_sha256": peft_io.params_sha256(model.params)})
    return out


def hf_with_adapter(hf_dir, adapter_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
        return peft.PeftModel.from_pretrained(hf, str(adapter_dir)).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny base in Meta and HF layout, an adapter on it (random B) in PEFT's format, its logits."""
    root = tmp_path_factory.mktemp("peft")
    model = tiny_model(rank=0)
    checkpoint.save_meta(model.state_dict(), model.params, root / "meta")
    checkpoint.save_hf(model.state_dict(), model.params, root / "hf")
    lora.add_lora(model, 4, 8.0, seed=7)
    randomize_b(model)
    export(model, root / "adapter", str(root / "meta"))
    with torch.no_grad():
        logits = model(tokens())
    return root, logits


def test_peft_loads_our_export_with_our_logits(tiny):
    root, logits = tiny
    config = json.loads((root / "adapter/adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
    with torch.no_grad():
        theirs = hf_with_adapter(root / "hf", root / "adapter")(tokens()).logits
    torch.testing.assert_close(theirs, logits, atol=1e-5, rtol=1e-5)


def test_peft_made_adapter_imports_with_peft_logits(tiny, tmp_path):
    root, _ = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(root / "hf"), dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=list(peft_io.HF_MODULES.values()), lora_dropout=0.0)
    made = peft.get_peft_model(hf, config)
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        theirs = made.eval()(tokens()).logits
    made.save_pretrained(str(tmp_path / "made"))
    ours = checkpoint.load_model(root / "meta", max_seq_len=64)
    peft_io.merge_adapter(ours, tmp_path / "made", root / "meta")
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens()), theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("to", ["meta", "hf"])
def test_convert_merges_the_adapter(tiny, tmp_path, to):
    root, logits = tiny
    out = tmp_path / "merged"
    assert convert_main([str(root / "meta"), str(out), "--to", to, "--lora", str(root / "adapter")]) == 0
    merged = checkpoint.load_model(out, max_seq_len=64)
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens()), logits, atol=1e-5, rtol=1e-5)


def merge_worker(base, adapter, mp):
    parallel.init_distributed(mp)
    model = checkpoint.load_model(base, max_seq_len=64)
    peft_io.merge_adapter(model, adapter, base)
    with torch.no_grad():
        return model(tokens())


@pytest.mark.slow
def test_merge_at_load_under_model_parallel(tmp_path):
    """Each rank adds its own shard of B A; at MP 4 > 2 K/V heads the wk/wv heads (and their B
    rows) are duplicated as the weights are."""
    model = Transformer(ModelArgs(**{**ARGS, "n_kv_heads": 2}))
    model.init_weights(seed=7)
    checkpoint.save_meta(model.state_dict(), model.params, tmp_path / "meta")
    lora.add_lora(model, 4, 8.0, seed=7)
    randomize_b(model)
    export(model, tmp_path / "adapter")
    with torch.no_grad():
        logits = model(tokens())
    for res in run_distributed(merge_worker, 4, str(tmp_path / "meta"), str(tmp_path / "adapter"), 4):
        torch.testing.assert_close(res, logits, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- a trained adapter, end to end


def test_lora_checkpoint_loads_in_build_and_generate(tmp_path):
    """Train 2 LoRA steps on a real base dir; Llama.build(out_dir) (base found through lora.json),
    Llama.build(base, lora=...) and generate.py --lora give the unmerged model's logits."""
    from llama.generation import Llama
    from train import train

    data_dir, tok = tiny_corpus(tmp_path / "corpus")
    base_model = Transformer(ModelArgs(**{**ARGS, "vocab_size": 640}))
    base_model.init_weights(seed=3)
    base = tmp_path / "base"
    checkpoint.save_meta(base_model.state_dict(), base_model.params, base)
    shutil.copy(tok, base / "tokenizer.model")
    cfg = load_config(None, [k for k in TINY_TRAIN if not k.startswith("model.")] + [
        f"data={data_dir}", f"out_dir={tmp_path / 'run'}", f"init_from={base}", "lora_rank=4", "lr=1e-2", "max_steps=2"])
    train(cfg)
    ckpt = tmp_path / "run/step_000002"
    unmerged = checkpoint.load_model(base, max_seq_len=64)
    lora.add_lora(unmerged, 4, 16.0)
    unmerged.load_state_dict(torch.load(ckpt / "adapter.00.pth", weights_only=True), strict=False)
    x = torch.randint(0, 640, (1, 12))
    with torch.no_grad():
        expected = unmerged(x)
        for llama in (Llama.build(str(tmp_path / "run"), max_seq_len=64), Llama.build(str(base), lora=str(ckpt))):
            torch.testing.assert_close(llama.model(x), expected, atol=1e-5, rtol=1e-5)
    from llama.generation.cli import main as generate_main

    assert generate_main(["--ckpt-dir", str(base), "--lora", str(ckpt), "--prompt", "def", "--max-gen-len", "4",
                          "--temperature", "0", "--max-seq-len", "64"]) == 0
    # python -m llama.eval perplexity --lora scores the merged model (and not the base)
    from llama.eval.cli import main as eval_main
    from llama.eval.perplexity import perplexity

    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 4)
    flags = ["perplexity", "--ckpt-dir", str(base), "--data", str(text), "--max-length", "32", "--stride", "16",
             "--max-seq-len", "64"]
    assert eval_main(flags + ["--lora", str(ckpt), "--json", str(tmp_path / "lora.json")]) == 0
    assert eval_main(flags + ["--json", str(tmp_path / "base.json")]) == 0
    tokenizer = Llama.build(str(base), max_seq_len=64).tokenizer
    with torch.no_grad():
        merged = perplexity(unmerged, tokenizer, text.read_text(), 32, 16).perplexity
    ours = json.loads((tmp_path / "lora.json").read_text())["perplexity"]
    assert ours == pytest.approx(merged, rel=1e-4)
    assert json.loads((tmp_path / "base.json").read_text())["perplexity"] != pytest.approx(ours, rel=1e-4)


# ---------------------------------------------------------------------------- bad adapters


def one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_lora_path_without_adapter_files(tiny, tmp_path, capsys):
    root, _ = tiny
    out = tmp_path / "out"
    assert convert_main([str(root / "meta"), str(out), "--to", "hf", "--lora", str(root / "meta")]) == 1
    line = one_line_error(capsys)
    assert str(root / "meta") in line and "adapter_config.json" in line
    assert not out.exists()


def test_adapter_for_another_base_names_both(tiny, tmp_path, capsys):
    root, _ = tiny
    other = Transformer(ModelArgs(**{**ARGS, "dim": 128}))
    other.init_weights(0)
    checkpoint.save_meta(other.state_dict(), other.params, tmp_path / "other")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert convert_main([str(tmp_path / "other"), str(out), "--to", "meta", "--lora", str(root / "adapter"),
                         "--overwrite"]) == 1
    line = one_line_error(capsys)
    assert str(root / "adapter") in line and str(tmp_path / "other") in line and "does not match" in line
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # even with --overwrite: nothing replaced
    # without our lora.json (a foreign PEFT adapter) the shapes still catch it, naming both
    foreign = tmp_path / "foreign"
    shutil.copytree(root / "adapter", foreign)
    (foreign / "lora.json").unlink()
    assert convert_main([str(tmp_path / "other"), str(out), "--to", "meta", "--lora", str(foreign), "--overwrite"]) == 1
    line = one_line_error(capsys)
    assert str(foreign) in line and str(tmp_path / "other") in line and "needs" in line


@pytest.mark.parametrize("option, value, words", [
    ("use_dora", True, "DoRA"), ("bias", "lora_only", "bias"), ("modules_to_save", ["lm_head"], "modules_to_save"),
    ("target_modules", ["q_proj", "lm_head"], "lm_head"), ("peft_type", "IA3", "IA3"),
])
def test_unsupported_peft_options_are_refused(tiny, tmp_path, capsys, option, value, words):
    root, _ = tiny
    bad = tmp_path / "bad"
    shutil.copytree(root / "adapter", bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config[option] = value
    (bad / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert convert_main([str(root / "meta"), str(out), "--to", "hf", "--lora", str(bad)]) == 1
    line = one_line_error(capsys)
    assert words in line and "adapter_config.json" in line
    assert not out.exists()


# ---------------------------------------------------------------------------- the config allowlist

PROJECTIONS = list(peft_io.HF_MODULES.values())


def peft_adapter(hf_dir, out, **options):
    """An adapter made and saved by `peft` itself on the HF base (random B, so it matters), and
    `peft`'s logits with it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
        made = peft.get_peft_model(hf, peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": PROJECTIONS,
                                                          **options}))
        with torch.no_grad():
            for name, p in made.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
            logits = made.eval()(tokens()).logits
        made.save_pretrained(str(out))
    return out, logits


def test_the_allowlist_covers_every_option_of_the_installed_peft():
    """Each LoraConfig field has a rule (implemented, metadata, or refused unless unset): a peft upgrade
    with new options fails here until someone decides what each means for a merge."""
    import dataclasses

    from llama.checkpoint.peft_config import CONFIG_RULES

    assert {f.name for f in dataclasses.fields(peft.LoraConfig)} <= set(CONFIG_RULES)


@pytest.mark.parametrize("options", [
    dict(rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6}, alpha_pattern={"self_attn.v_proj": 3.0}),
    dict(layers_to_transform=[1]), dict(target_modules="all-linear"), dict(exclude_modules=["o_proj", "up_proj"]),
    dict(use_rslora=True, r=6), pytest.param(dict(init_lora_weights="gaussian"), marks=pytest.mark.slow),
    pytest.param(dict(target_modules=r".*\.(q|v)_proj"), marks=pytest.mark.slow),
], ids=["rank-alpha-patterns", "layers", "all-linear", "exclude", "rslora", "gaussian", "regex"])
def test_peft_options_we_implement_merge_to_peft_logits(tiny, tmp_path, options):
    """Adapters peft 0.21 writes with the options the loader implements (every other key at peft's
    default, metadata included) merge here to peft's own logits."""
    root, _ = tiny
    adapter, theirs = peft_adapter(root / "hf", tmp_path / "made", **options)
    ours = checkpoint.load_model(root / "meta", max_seq_len=64)
    peft_io.merge_adapter(ours, adapter, root / "meta")
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens()), theirs, atol=1e-5, rtol=1e-5)


SLOW = pytest.mark.slow  # the same table, more cases: two run in the quick loop


@pytest.mark.parametrize("options, key", [
    (dict(alora_invocation_tokens=[1, 2]), "alora_invocation_tokens"), (dict(use_dora=True), "use_dora"),
    pytest.param(dict(init_lora_weights="pissa"), "init_lora_weights", marks=SLOW),
    pytest.param(dict(use_qalora=True), "use_qalora", marks=SLOW),
    pytest.param(dict(lora_bias=True), "lora_bias", marks=SLOW),
    pytest.param(dict(modules_to_save=["lm_head"]), "modules_to_save", marks=SLOW),
    pytest.param(dict(init_lora_weights="olora"), "init_lora_weights", marks=SLOW),
    pytest.param(dict(init_lora_weights="mica"), "init_lora_weights", marks=SLOW),
    pytest.param(dict(target_modules=PROJECTIONS + ["lm_head"]), "target_modules", marks=SLOW),
    pytest.param(dict(trainable_token_indices=[1, 2]), "trainable_token_indices", marks=SLOW),
    pytest.param(dict(layer_replication=[[0, 2], [0, 2]]), "layer_replication", marks=SLOW),
    pytest.param(dict(target_modules=["q_proj"], target_parameters=["mlp.down_proj.weight"]), "target_parameters",
                 marks=SLOW),
], ids=lambda v: v if isinstance(v, str) else None)
def test_peft_written_options_we_do_not_implement_are_refused(tiny, tmp_path, options, key):
    """Adapters peft 0.21 writes with an option the loader does not implement: refused, one line naming it."""
    root, _ = tiny
    adapter, _ = peft_adapter(root / "hf", tmp_path / "made", **options)
    with pytest.raises(lora.LoRAError, match=rf"adapter_config.json: {key}=") as e:
        peft_io.read_adapter(adapter, ModelArgs(**ARGS), "base")
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def plain_peft_adapter(tiny, tmp_path_factory):
    return peft_adapter(tiny[0] / "hf", tmp_path_factory.mktemp("plain") / "made")[0]


@pytest.mark.parametrize("key, value, words", [
    ("arrow_config", {"top_k": 2}, "Arrow"), ("frobnicate", 1, "not an option this loader implements"),
    ("r", 8.9, "positive integer"), ("r", True, "positive integer"), ("lora_alpha", float("nan"), "finite"),
    ("lora_alpha", -8, "positive"), ("lora_dropout", 1.5, "[0, 1)"), ("rank_pattern", {"q_proj": 2.5}, "integer"),
    ("alpha_pattern", {"q_proj": float("inf")}, "finite"), ("target_modules", "q_proj(", "seven projections"),
    ("layers_to_transform", [0], "leave out"), ("exclude_modules", ["wo", "o_proj"], "leave out"),
])
def test_bad_values_in_a_peft_config_are_one_line_naming_the_key(tiny, plain_peft_adapter, tmp_path, capsys, key,
                                                                 value, words):
    """A peft-written adapter with one key changed: one line naming the key (or the tensor it
    contradicts); the first case through the CLI (exit 1, nothing written)."""
    root, _ = tiny
    adapter = shutil.copytree(plain_peft_adapter, tmp_path / "bad")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, key: value}))
    if key == "arrow_config":
        out = tmp_path / "out"
        capsys.readouterr()  # transformers' progress bars
        assert convert_main([str(root / "meta"), str(out), "--to", "hf", "--lora", str(adapter)]) == 1
        line = one_line_error(capsys)
        assert not out.exists()
    else:
        with pytest.raises(lora.LoRAError) as e:
            peft_io.read_adapter(adapter, ModelArgs(**ARGS), "base")
        line = str(e.value)
    assert "\n" not in line and words in line and (key in line or "layers.1" in line or "o_proj" in line), line


def test_a_non_finite_adapter_tensor_is_refused(plain_peft_adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = shutil.copytree(plain_peft_adapter, tmp_path / "bad")
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    tensors[key][3, 1] = float("nan")
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(lora.LoRAError, match=rf"{key} holds non-finite"):
        peft_io.read_adapter(adapter, ModelArgs(**ARGS), "base")


# ---------------------------------------------------------------------------- SmolLM2, a real model


@pytest.mark.slow
def test_smollm2_adapters_against_hf_peft_both_ways(smollm2_gguf, tmp_path):
    """Our adapter exported as PEFT, applied by `peft` to the HF export of the same base in
    transformers, gives our logits; an adapter made by `peft` (random B) merges here to peft's logits."""
    model = checkpoint.load_model(smollm2_gguf, max_seq_len=64, dtype=torch.float32)
    checkpoint.save_hf(model.state_dict(), model.params, tmp_path / "hf")
    lora.add_lora(model, 8, 16.0, seed=1)
    randomize_b(model)
    export(model, tmp_path / "ours", str(smollm2_gguf))
    x = torch.randint(0, model.params.vocab_size, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = model(x)
        base = checkpoint.load_model(smollm2_gguf, max_seq_len=64, dtype=torch.float32)(x)
        assert (ours - base).abs().max() > 1e-2  # the adapter matters
        theirs = hf_with_adapter(tmp_path / "hf", tmp_path / "ours")(x).logits
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    del model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    made = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                        "down_proj"]))
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
        theirs = made.eval()(x).logits
    made.save_pretrained(str(tmp_path / "made"))
    merged = checkpoint.load_model(smollm2_gguf, max_seq_len=64, dtype=torch.float32)
    adapter = peft_io.merge_adapter(merged, tmp_path / "made", smollm2_gguf)
    assert adapter.targets == ["wq", "wk", "wv", "w2"] and adapter.scale == 2.0
    with torch.no_grad():
        torch.testing.assert_close(merged(x), theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_lora_on_smollm2_lowers_the_held_out_sft_loss(tmp_path):
    from llama.train.loop import evaluate, loop
    from train import setup

    cfg = load_config(None, ["init_from=smollm2", "data=configs/train/chat_example.jsonl", "sft=true",
                             f"out_dir={tmp_path / 'run'}", f"data_cache={tmp_path / 'data'}", "val_fraction=0.25",
                             "seq_len=64", "batch_size=2", "micro_batch_size=2", "max_steps=4", "warmup_steps=1",
                             "lr=2e-3", "min_lr=2e-4", "weight_decay=0.0", "eval_every=4", "eval_batches=1",
                             "save_every=0", "log_every=1", "lora_rank=8", "lora_alpha=16"])
    run = setup(cfg)
    before = evaluate(run)
    result = loop(run)
    after = result["val_losses"][4]
    assert after < before - 0.05, (before, after)
