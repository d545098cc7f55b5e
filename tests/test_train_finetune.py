"""Fine-tuning: from one of our checkpoints on chat data (SFT), and from GGUF, HF, Meta and BPE
checkpoints, each keeping its tokenizer and chat format in the checkpoint it writes."""

import json
import shutil
from pathlib import Path

import pytest

from llama.model import ModelArgs, Transformer
from llama.train.config import load_config
from tests.helpers import TINY_TRAIN, tiny_train as train
from train import train as run_train


def test_sft_from_a_checkpoint(corpus, tmp_path):
    """init_from one of our checkpoints (tokenizer found next to it), chat jsonl, assistant-only loss."""
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
    result = run_train(cfg)
    assert sum(result["losses"][-3:]) / 3 < result["losses"][0] - 0.5, result["losses"]
    assert (tmp_path / "sft/step_000012/tokenizer.model").is_file()


DIALOG = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."},
          {"role": "user", "content": "And 3 + 3?"}]


def _tiny_gguf_with_smollm2_tokenizer(path, smollm2_gguf):
    """A 1-layer model that carries SmolLM2's real tokenizer metadata (49152 tokens, ChatML template)."""
    from tests.helpers import write_gguf

    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=49152, hidden_dim=64,
                     rope_theta=100000.0, tie_word_embeddings=True, max_seq_len=8192)
    model = Transformer(args)
    model.init_weights(0)
    return write_gguf(path, model.state_dict(), args, tokenizer_from=smollm2_gguf)


@pytest.fixture(scope="module")
def fine_tune_sources(tmp_path_factory, corpus, smollm2_gguf, hf_smollm2_tokenizer, llama3_tokenizer_path):
    """The four kinds of checkpoint a fine-tune starts from, each a tiny model with a real tokenizer."""
    from llama import checkpoint

    root = tmp_path_factory.mktemp("sources")
    sources = {"gguf": _tiny_gguf_with_smollm2_tokenizer(root / "smol.gguf", smollm2_gguf)}
    # HF: transformers' own tokenizer files for SmolLM2 (tokenizer.json, tokenizer_config.json, template)
    small = checkpoint.load_model(sources["gguf"], max_seq_len=16)
    checkpoint.save_hf(small.state_dict(), small.params, root / "hf")
    hf_smollm2_tokenizer.save_pretrained(root / "hf")
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
    source = fine_tune_sources[kind]
    text = tmp_path / "text.txt"
    text.write_text("Some words to fine-tune on, repeated. " * 40)
    keep = [o for o in TINY_TRAIN if not o.startswith("model.") and not o.startswith(("seq_len", "batch_size", "micro"))]
    cfg = load_config(None, keep + [f"init_from={source}", f"data={text}", "max_steps=1", "seq_len=16",
                                    "batch_size=2", "micro_batch_size=2", f"out_dir={tmp_path / 'out'}",
                                    f"data_cache={tmp_path / 'cache'}"])
    ckpt = Path(run_train(cfg)["checkpoint"])
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
