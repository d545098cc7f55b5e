"""SmolLM2's byte-level BPE (llama/tokenizer/bpe.py) against HF transformers/tokenizers on the same files."""

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama.tokenizer.bpe import ByteLevelBPETokenizer
from llama.tokenizer.chat import ChatMLFormat
from llama.tokenizer import StreamDecoder, load_tokenizer

CORPUS = [
    "Hello world!", "What is the capital of France?",
    "def f(x):\n\treturn x**2  # square\n\n\nclass A:\n    pass\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i] * 2; }",
    "日本語のテキスト、中文，한국어 텍스트", "Ελληνικά кириллица עברית العربية हिन्दी",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇫🇷 ❤️",
    "   leading and trailing   ", "many     spaces\t\t\ttabs\n\n\n\nnewlines \r\n\r\n",
    "it's I'M we'll THEY'RE don't", "x=10.5; y = 1e-3; z=-42", "In 2024, 12345 apples  1  22   333",
    "a\u00a0b\u2003c\u200bd", "<|im_start|>user\nhi<|im_end|>\n", "<repo_name>x<file_sep>y",
    "https://example.com/a?b=c&d=e#f", "Ω≈ç√∫˜µ≤≥÷ åß∂ƒ©˙∆˚¬…æ", "", " ", "\n", "\x00\x04\x7f",
]


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_original(hf_smollm2_tokenizer):
    """HF `tokenizers` running SmolLM2's original tokenizer.json pipeline: digits isolated, then
    GPT-2 byte-level. (transformers' GGUF import drops the digit step that the GGUF's
    `tokenizer.ggml.pre = "smollm"` names; llama.cpp applies it, and so do we.)"""
    tokenizers = pytest.importorskip("tokenizers")
    ref = tokenizers.Tokenizer.from_str(hf_smollm2_tokenizer.backend_tokenizer.to_str())
    ref.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Digits(individual_digits=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return ref


def test_gguf_metadata(smol):
    assert isinstance(smol, ByteLevelBPETokenizer)
    assert (smol.n_words, smol.bos_id, smol.eos_id, smol.pad_id) == (49152, 1, 2, 2)
    assert smol.add_bos is False  # tokenizer.ggml.add_bos_token
    assert smol.stop_tokens == {0, 2}  # <|endoftext|>, <|im_end|> (= EOS)
    assert smol.special_tokens["<|im_start|>"] == 1 and len(smol.special_tokens) == 17
    assert isinstance(smol.chat_format, ChatMLFormat)


def test_parity_with_hf_on_corpus(smol, hf_original, hf_smollm2_tokenizer):
    for text in CORPUS:
        ids = smol.encode(text, bos=False, eos=False, allowed_special="all")
        assert ids == hf_original.encode(text, add_special_tokens=False).ids, text
        assert smol.decode(ids) == hf_smollm2_tokenizer.decode(ids)
        if not any(c.isdigit() for c in text):  # no digits: the GGUF import's pipeline agrees too
            assert ids == hf_smollm2_tokenizer(text, add_special_tokens=False)["input_ids"], text


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.one_of(st.characters(codec="utf-8"), st.sampled_from(list(" \t\n0123456789'sdé😀日"))),
                    max_size=60))
def test_parity_with_hf_fuzz(smol, hf_original, text):
    ids = smol.encode(text, bos=False, eos=False)
    assert ids == hf_original.encode(text, add_special_tokens=False).ids
    assert smol.decode(ids) == hf_original.decode(ids, skip_special_tokens=False)


def test_special_tokens_are_text_unless_allowed(smol):
    assert 1 not in smol.encode("<|im_start|>", bos=False, eos=False)
    assert smol.encode("<|im_start|>hi", bos=True, eos=True, allowed_special={"<|im_start|>"})[:2] == [1, 1]
    with pytest.raises(ValueError, match="im_end"):
        smol.encode("<|im_end|>", bos=False, eos=False, disallowed_special="all")


def test_decode_any_ids_matches_hf(smol, hf_smollm2_tokenizer):
    rng = random.Random(0)
    for _ in range(200):  # random ids split multi-byte characters: replacement chars must agree
        ids = [rng.randrange(smol.n_words) for _ in range(rng.randrange(1, 12))]
        assert smol.decode(ids) == hf_smollm2_tokenizer.decode(ids), ids
    with pytest.raises(ValueError, match="out of range"):
        smol.decode([49152])


def test_long_whitespace_run_is_fast(smol, hf_original):
    text = " " * 100_000 + "x" + "\n" * 30_000
    assert smol.encode(text, bos=False, eos=False) == hf_original.encode(text, add_special_tokens=False).ids


DIALOGS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Write a haiku"}, {"role": "assistant", "content": "Leaves fall\nsoftly"},
     {"role": "user", "content": "  Another one, please!  \n"}],
]


def test_chatml_matches_hf_chat_template(smol, hf_smollm2_tokenizer):
    for dialog in DIALOGS:
        expected = hf_smollm2_tokenizer.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        assert smol.chat_format.encode_dialog_prompt(dialog) == list(expected)
    message = smol.chat_format.encode_message({"role": "user", "content": "Hi"})
    assert smol.decode(message) == "<|im_start|>user\nHi<|im_end|>\n"


def test_from_hf_tokenizer_json(tmp_path, hf_smollm2_tokenizer, smol):
    hf_smollm2_tokenizer.save_pretrained(tmp_path)
    from_dir, from_file = load_tokenizer(tmp_path), load_tokenizer(tmp_path / "tokenizer.json")
    # This tokenizer.json (written by transformers from the GGUF) has no digit step; we follow the file.
    for text in CORPUS:
        expected = hf_smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert from_dir.encode(text, bos=False, eos=False, allowed_special="all") == expected
        assert from_file.encode(text, bos=False, eos=False, allowed_special="all") == expected
    assert (from_dir.bos_id, from_dir.eos_id, from_dir.pad_id, from_dir.add_bos) == (1, 2, 2, False)
    assert from_dir.stop_tokens == smol.stop_tokens
    assert from_dir.chat_format.encode_dialog_prompt(DIALOGS[0]) == smol.chat_format.encode_dialog_prompt(DIALOGS[0])


def test_original_style_tokenizer_json_and_add_bos(tmp_path, hf_smollm2_tokenizer, smol):
    hf_smollm2_tokenizer.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    tok = load_tokenizer(tmp_path)
    assert tok.add_bos is True
    for text in CORPUS:
        assert tok.encode(text, bos=False, eos=False) == smol.encode(text, bos=False, eos=False)
    assert tok.chat_format.encode_dialog_prompt(DIALOGS[0])[0] == tok.bos_id


@pytest.mark.parametrize("pre_tokenizer", [
    {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": False},
        {"type": "Split", "pattern": {"String": "\n"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
])
def test_tokenizer_json_pre_tokenizers_follow_hf(tmp_path, hf_smollm2_tokenizer, pre_tokenizer):
    tokenizers = pytest.importorskip("tokenizers")
    hf_smollm2_tokenizer.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    (tmp_path / "tokenizer.json").write_text(json.dumps({**data, "pre_tokenizer": pre_tokenizer}))
    ours, ref = load_tokenizer(tmp_path), tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in CORPUS:
        assert ours.encode(text, bos=False, eos=False, allowed_special="all") == ref.encode(text).ids, text


def test_unsupported_tokenizer_json_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps(
        {"model": {"type": "Unigram", "vocab": []}, "decoder": {"type": "Metaspace"}}))
    with pytest.raises(ValueError, match="only byte-level BPE"):
        load_tokenizer(tmp_path)


@settings(max_examples=100, deadline=None)
@given(text=st.text(st.one_of(st.characters(codec="utf-8"), st.sampled_from(list("😀👍🏽日本語 ")))),
       noise=st.lists(st.integers(0, 49151), max_size=6))
def test_stream_decoder_smollm2(smol, text, noise):
    def stream(ids):
        decoder = StreamDecoder(smol)
        return [decoder.push(i) for i in ids] + [decoder.flush()]

    ids = smol.encode(text, bos=False, eos=False)
    pieces = stream(ids)
    assert "".join(pieces) == smol.decode(ids)
    if "\ufffd" not in text and smol.decode(ids) == text:  # (SmolLM2 lacks bytes 0xF1-0xF3: U+40000+)
        assert not any("\ufffd" in p for p in pieces)  # an emoji shows whole or not at all
    assert "".join(stream(noise + ids)) == smol.decode(noise + ids)  # any ids, even broken UTF-8


@pytest.mark.slow
def test_llama3_hf_tokenizer_json_matches_tiktoken(tmp_path, llama3_tokenizer_path):
    """A Llama 3 HF checkpoint ships tokenizer.json (Split with Meta's pattern + ByteLevel, ignore_merges)
    instead of tokenizer.model; transformers' own converter writes one from the official file."""
    convert = pytest.importorskip("transformers.convert_slow_tokenizer")
    from llama.tokenizer import Tokenizer

    llama3 = Tokenizer(llama3_tokenizer_path)
    converter = convert.TikTokenConverter(vocab_file=str(llama3_tokenizer_path), pattern=Tokenizer.pat_str)
    data = json.loads(converter.converted().to_str())
    data["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for t, i in llama3.special_tokens.items()]
    data["post_processor"] = {"type": "TemplateProcessing", "single": [
        {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    tok = load_tokenizer(tmp_path)
    for text in CORPUS:
        assert tok.encode(text, bos=False, eos=False) == llama3.encode(text, bos=False, eos=False), text
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.add_bos) == (128256, 128000, 128009, True)
    assert tok.stop_tokens == llama3.stop_tokens
    assert tok.chat_format.encode_dialog_prompt(DIALOGS[2]) == llama3.chat_format.encode_dialog_prompt(DIALOGS[2])
