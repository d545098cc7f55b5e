"""Llama 3 (official tokenizer.model), Llama 2 (sentencepiece), load_tokenizer, errors, streaming."""

import random

import pytest
import tiktoken.load
from hypothesis import example, given, settings
from hypothesis import strategies as st

from llama.tokenizer import (
    ChatFormat, SentencePieceTokenizer, StreamDecoder, Tokenizer, TokenizerError, check_vocab, load_tokenizer,
)

VARIED = [
    "This is a test sentence.",
    "def f(x):\n\treturn x ** 2  # square\n\n\n",
    "日本語のテキスト、中文，한국어 텍스트",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "   leading and trailing   \n",
    "it's I'M we'll THEY'RE",
    "numbers 1234567 3.14159 1e-9 ٣٤٥",
    "a\u00a0b\u2003c\u200bd",
    "tab\t\tcr\r\nlf\n\n\nend",
    "<|eot_id|> and <|begin_of_text|> as plain text",
    "",
    " ",
    "Ω≈ç√∫˜µ≤≥÷ åß∂ƒ©˙∆˚¬…æ",
]


@pytest.fixture(scope="module")
def llama3(llama3_tokenizer_path):
    return Tokenizer(llama3_tokenizer_path)


@pytest.fixture(scope="module")
def tiktoken_reference(llama3_tokenizer_path, llama3):
    """tiktoken's own loader + Encoding over the same file: independent of our file parsing."""
    ranks = tiktoken.load.load_tiktoken_bpe(str(llama3_tokenizer_path))
    return tiktoken.Encoding("ref", pat_str=Tokenizer.pat_str, mergeable_ranks=ranks,
                             special_tokens=llama3.special_tokens)


# ---- Llama 3: Meta's published expectations ------------------------------------------------------
def test_llama3_special_tokens(llama3):
    s = llama3.special_tokens
    assert s["<|begin_of_text|>"] == 128000 and s["<|end_of_text|>"] == 128001
    first = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
             "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]
    assert [s[n] for n in first] == list(range(128000, 128012))
    assert s["<|reserved_special_token_2|>"] == 128012 and s["<|reserved_special_token_245|>"] == 128255
    assert len(s) == 256 and llama3.n_words == 128256
    assert llama3.stop_tokens == {128001, 128008, 128009} and llama3.add_bos
    assert (llama3.bos_id, llama3.eos_id, llama3.eot_id, llama3.pad_id) == (128000, 128001, 128009, 128004)


def test_llama3_published_encode_decode(llama3):
    ids = [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert llama3.encode("This is a test sentence.", bos=True, eos=True) == ids
    assert llama3.decode(ids) == "<|begin_of_text|>This is a test sentence.<|end_of_text|>"


def test_llama3_published_chat_format(llama3):
    fmt = ChatFormat(llama3)
    assert fmt.encode_message({"role": "user", "content": "This is a test sentence."}) == [
        128006, 882, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009]
    dialog = [{"role": "system", "content": "This is a test sentence."},
              {"role": "user", "content": "This is a response."}]
    assert fmt.encode_dialog_prompt(dialog) == [
        128000, 128006, 9125, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009,
        128006, 882, 128007, 271, 2028, 374, 264, 2077, 13, 128009, 128006, 78191, 128007, 271]
    assert llama3.chat_format.encode_dialog_prompt(dialog) == fmt.encode_dialog_prompt(dialog)


def test_llama3_matches_tiktoken_and_round_trips(llama3, tiktoken_reference):
    for text in VARIED:
        ids = llama3.encode(text, bos=False, eos=False)
        assert ids == tiktoken_reference.encode(text, disallowed_special=())
        assert llama3.decode(ids) == text


def test_llama3_special_text_is_plain_unless_allowed(llama3):
    assert 128009 not in llama3.encode("<|eot_id|>", bos=False, eos=False)
    assert llama3.encode("a<|eot_id|>", bos=False, eos=False, allowed_special="all") == [64, 128009]
    with pytest.raises(ValueError):
        llama3.encode("<|eot_id|>", bos=False, eos=False, disallowed_special="all")


def meta_slices(s, max_run):
    """Reference: Meta's rule, char by char -- a new slice starts whenever the current run of
    whitespace (or of non-whitespace) would exceed max_run chars."""
    slices, start, run, prev_space = [], 0, 0, s[:1].isspace()
    for i, ch in enumerate(s):
        run = run + 1 if ch.isspace() == prev_space else 1
        prev_space = ch.isspace()
        if run > max_run:
            slices.append(s[start:i])
            start, run = i, 1
    return slices + [s[start:]]


def chunkwise_reference(enc, s):
    """The official approach: 400k-char chunks, then Meta's 25k-run slices, each encoded alone."""
    return [t for i in range(0, len(s), 400_000) for part in meta_slices(s[i:i + 400_000], 25_000)
            for t in enc.encode(part, disallowed_special=())]


@pytest.mark.parametrize("kind", ["1M varied chars", "100k spaces", "60k letters", "mixed runs"])
def test_llama3_long_inputs_match_chunkwise(llama3, tiktoken_reference, kind):
    rng = random.Random(0)
    if kind == "1M varied chars":
        text = "".join(rng.choice(VARIED) for _ in range(40_000))[:1_000_000]
    elif kind == "100k spaces":
        text = " " * 100_000
    elif kind == "60k letters":
        text = "".join(rng.choice("abcxyz") for _ in range(60_000))
    else:  # runs straddling the 25k limit and a 400k boundary
        text = ("x" * 25_001 + " " * 24_999 + "\n" * 30_000 + "é" * 50_000) * 4 + "tail"
    ids = llama3.encode(text, bos=True, eos=False)
    assert ids[0] == 128000 and ids[1:] == chunkwise_reference(tiktoken_reference, text)
    assert llama3.decode(ids[1:]) == text


def test_one_llama3_split_pattern():
    """Meta's tokenizer, the GGUF pre-tokenizer table and BPE training split text with one regex."""
    from llama.tokenizer import bpe
    from llama import bpe_train

    assert Tokenizer.pat_str is bpe.LLAMA3_PATTERN
    assert bpe.GGUF_PRE_TOKENIZERS["llama-bpe"] == [bpe.LLAMA3_PATTERN]
    assert bpe_train.count_chunks.__defaults__[0] is bpe.LLAMA3_PATTERN


def test_split_long_runs_matches_meta_rule():
    from llama.tokenizer.llama3 import split_long_runs

    rng = random.Random(1)
    for _ in range(300):
        s = "".join(rng.choice(" \t\nab\u00a0é") for _ in range(rng.randrange(0, 60)))
        max_run = rng.randrange(1, 8)
        assert list(split_long_runs(s, max_run)) == meta_slices(s, max_run)


# ---- Llama 2: sentencepiece -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama2_model(tmp_path_factory):
    """A small sentencepiece BPE model trained with Llama 2's settings (byte fallback, split digits,
    dummy prefix, identity normalization, unk=0 bos=1 eos=2, no pad)."""
    spm = pytest.importorskip("sentencepiece")
    rng = random.Random(0)
    words = ["the", "model", "token", "Llama", "chat", "system", "user", "reply", "over", "under", "fast"]
    lines = [" ".join(rng.choice(words) for _ in range(12)) + f" {rng.randrange(1000)}." for _ in range(3000)]
    lines += ["[INST] <<SYS>> <</SYS>> [/INST] 日本語 😀"] * 50
    path = tmp_path_factory.mktemp("sp") / "tokenizer"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(path), vocab_size=400, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=2)
    return path.with_suffix(".model")


def test_llama2_sentencepiece(llama2_model):
    import sentencepiece

    tok = load_tokenizer(llama2_model)
    assert isinstance(tok, SentencePieceTokenizer)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(llama2_model))
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (400, 1, 2, -1, True)
    assert tok.stop_tokens == {2}
    for text in VARIED:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids == [1, *sp.encode(text), 2]
        assert tok.decode(ids) == sp.decode(ids)


def test_llama2_chat_format_is_the_documented_one(llama2_model):
    tok = load_tokenizer(llama2_model)
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is Llama?  "},
              {"role": "assistant", "content": "A model."}, {"role": "user", "content": "Chat?"}]
    ids = tok.chat_format.encode_dialog_prompt(dialog)
    # Documented (Meta's llama README / generation.py): <s>[INST] <<SYS>>\n{sys}\n<</SYS>>\n\n{user} [/INST]
    # {answer} </s><s>[INST] {user} [/INST], one sentencepiece call per <s>...</s> segment.
    first = "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is Llama? [/INST] A model. "
    expected = [1, *tok.sp_model.encode(first), 2, 1, *tok.sp_model.encode("[INST] Chat? [/INST]")]
    assert ids == expected
    assert tok.chat_format.encode_message({"role": "user", "content": "Chat?"}) == expected[expected.index(2) + 1:]
    with pytest.raises(ValueError, match="roles"):
        tok.chat_format.encode_dialog_prompt([{"role": "assistant", "content": "hi"}])


# ---- load_tokenizer and errors --------------------------------------------------------------------
def test_load_tokenizer_detects_llama3(llama3_tokenizer_path, tmp_path):
    assert isinstance(load_tokenizer(llama3_tokenizer_path), Tokenizer)
    (tmp_path / "tokenizer.model").symlink_to(llama3_tokenizer_path)
    assert isinstance(load_tokenizer(tmp_path), Tokenizer)  # a Meta checkpoint directory


def test_errors_name_the_file(tmp_path, llama3_tokenizer_path, smollm2_gguf):
    assert issubclass(TokenizerError, ValueError)
    with pytest.raises(TokenizerError, match="no such file"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer(tmp_path / "missing.model")
    lines = llama3_tokenizer_path.read_text().splitlines()
    bad = tmp_path / "corrupt.model"
    bad.write_text("\n".join(lines[:10] + ["this is not base64!"] + lines[10:20]))
    with pytest.raises(TokenizerError, match=r"corrupt\.model:11"):
        load_tokenizer(bad)
    gaps = tmp_path / "gaps.model"
    gaps.write_text("\n".join(lines[:100] + lines[200:300]))
    with pytest.raises(TokenizerError, match="no gaps"):
        load_tokenizer(gaps)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(1000)))
    with pytest.raises(TokenizerError, match="not a tokenizer file"):
        load_tokenizer(junk)
    truncated = tmp_path / "model.gguf"
    truncated.write_bytes(smollm2_gguf.read_bytes()[:5000])
    with pytest.raises(TokenizerError, match="model.gguf"):
        load_tokenizer(truncated)
    broken_json = tmp_path / "tokenizer.json"
    broken_json.write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(broken_json)
    with pytest.raises(TokenizerError, match="no tokenizer.model"):
        load_tokenizer(tmp_path / "..")


def test_check_vocab(llama3):
    with pytest.raises(ValueError, match="token id 128256 is out of range"):
        llama3.decode([128256])
    check_vocab(llama3, 128256)
    with pytest.raises(TokenizerError, match=r"128256 tokens.*vocab_size is 32000"):
        check_vocab(llama3, 32000)


# ---- streaming decode -------------------------------------------------------------------------------
def stream(tok, ids):
    decoder = StreamDecoder(tok)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


TEXT = st.text(st.one_of(st.characters(codec="utf-8"), st.sampled_from(list("😀👍🏽🇫🇷日本語한국 \n\té"))),
               max_size=40)


@settings(max_examples=100, deadline=None)
@given(text=TEXT)
def test_stream_decoder_llama3_text(llama3, text):
    ids = llama3.encode(text, bos=True, eos=False)
    pieces = stream(llama3, ids)
    assert "".join(pieces) == llama3.decode(ids)
    assert "\ufffd" in text or not any("\ufffd" in p for p in pieces)  # never half a character on screen


@settings(max_examples=150, deadline=None)
@given(ids=st.lists(st.integers(0, 128255), max_size=30))
def test_stream_decoder_llama3_any_ids(llama3, ids):
    assert "".join(stream(llama3, ids)) == llama3.decode(ids)


@pytest.fixture(scope="module")
def llama2(llama2_model):
    return load_tokenizer(llama2_model)


@settings(max_examples=100, deadline=None)
@given(text=TEXT, extra=st.lists(st.integers(0, 399), max_size=8))
@example(text=" ", extra=[]).via("a lone space is two '▁' pieces; only the first loses its space")
@example(text="  a\n", extra=[1, 2, 0])
@example(text="", extra=[3 + 0xE7, 3 + 0xBB]).via("broken UTF-8: sentencepiece gives one U+FFFD per byte")
@example(text="", extra=[3 + 0xC2, 2, 3 + 0x85]).via("a control token cuts a run of byte pieces")
def test_stream_decoder_sentencepiece(llama2, text, extra):
    tok = llama2
    ids = tok.encode(text, bos=True, eos=False)
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids)
    assert "\ufffd" in text or not any("\ufffd" in p for p in pieces)
    mixed = extra + ids  # any ids, including stray byte tokens, unk and control tokens
    assert "".join(stream(tok, mixed)) == tok.decode(mixed)
