"""BPE training (llama/tokenizer/train.py): exact merges vs a naive trainer, Meta-format output, CLI."""

import subprocess
import sys
import sysconfig
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama.tokenizer.train import count_chunks, learn_merges
from llama.tokenizer import Tokenizer, TokenizerError, load_tokenizer, train_bpe

STDLIB = Path(sysconfig.get_paths()["stdlib"])
UNICODE = "日本語のテキスト 😀👍🏽 Ελληνικά кириллица — “quotes” naïve café\n" * 20


def naive_merges(chunk_counts: Counter, n_ranks: int) -> list[bytes]:
    """Reference trainer: recount every pair over every chunk at each step (slow, obviously right)."""
    words = {tuple(c.encode("utf-8", "surrogateescape")): n for c, n in chunk_counts.items()}
    tokens = [bytes([b]) for b in range(256)]
    while len(tokens) < n_ranks:
        pairs = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))  # most frequent; ties -> smallest ids
        merged = tokens[best[0]] + tokens[best[1]]
        new_id = tokens.index(merged) if merged in tokens else len(tokens)
        if new_id == len(tokens):
            tokens.append(merged)
        rewritten = {}
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i:i + 2] == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            rewritten[tuple(out)] = rewritten.get(tuple(out), 0) + n
        words = rewritten
    return tokens


def test_incremental_merges_equal_naive_trainer():
    text = (STDLIB / "textwrap.py").read_text() + UNICODE + "aaaa aaaaa abab abababab\n" * 5
    counts = count_chunks([text])
    assert learn_merges(counts, 256 + 300) == naive_merges(counts, 256 + 300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    files = [STDLIB / name for name in ("argparse.py", "json/decoder.py", "textwrap.py", "string.py")]
    out = tmp_path_factory.mktemp("bpe") / "tokenizer.model"
    return train_bpe(files + [UNICODE], 1000, out)


def test_trained_file_loads_with_exact_vocab_size(trained):
    tok = Tokenizer(trained)
    assert tok.n_words == 1000 and len(trained.read_text().splitlines()) == 1000 - 256
    assert tok.bos_id == 1000 - 256 and isinstance(load_tokenizer(trained), Tokenizer)
    held_out = (STDLIB / "shlex.py").read_text()
    ids = tok.encode(held_out, bos=False, eos=False)
    assert len(ids) < len(held_out.encode()) / 2.5  # it learned Python: > 2.5 bytes per token
    assert tok.decode(ids) == held_out
    assert tok.chat_format.encode_dialog_prompt([{"role": "user", "content": "hi"}])[0] == tok.bos_id


@pytest.fixture(scope="module")
def trained_tok(trained):
    return load_tokenizer(trained)


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.characters(codec="utf-8"), max_size=80))
def test_trained_round_trips_any_text(trained_tok, text):
    tok = trained_tok
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text


def test_train_edge_cases(tmp_path, capsys):
    with pytest.raises(TokenizerError, match="no such training file"):
        train_bpe([str(tmp_path / "typo.txt")], 1000, tmp_path / "x.model")
    with pytest.raises(TokenizerError, match="at least 512"):
        train_bpe(["some text"], 300, tmp_path / "x.model")
    out = train_bpe(["tiny corpus"], 1000, tmp_path / "tiny.model")  # runs out of pairs
    assert "warning" in capsys.readouterr().err and Tokenizer(out).n_words < 1000
    raw = tmp_path / "latin1.txt"
    raw.write_bytes("café ÉÉ résumé ".encode("latin-1") * 50)  # not UTF-8: the raw bytes are learned
    tok = Tokenizer(train_bpe([raw], 600, tmp_path / "latin1.model"))
    assert b" \xc9\xc9" in {tok.model.decode_single_token_bytes(i) for i in range(tok.n_words - 256)}


def test_cli(tmp_path, capsys):
    from llama.tokenizer.__main__ import main

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text((STDLIB / "textwrap.py").read_text())
    (data / "b.txt").write_text(UNICODE)
    assert main(["train", "--input", str(data), "--vocab-size", "700", "--out", str(tmp_path / "t.model")]) == 0
    assert "700 tokens" in capsys.readouterr().out and Tokenizer(tmp_path / "t.model").n_words == 700
    assert main(["encode", "--tokenizer", str(tmp_path / "t.model"), "def f(): pass"]) == 0
    assert '"ids": [444' in capsys.readouterr().out  # BOS = 700 - 256
    for bad in (["train", "--input", str(tmp_path / "nope"), "--vocab-size", "700", "--out", "x"],
                ["encode", "--tokenizer", str(tmp_path / "missing.model"), "hi"]):
        assert main(bad) == 1 and capsys.readouterr().err.startswith("error: ")
    # The real entry point: one line on stderr, exit status 1, no traceback.
    result = subprocess.run([sys.executable, "-m", "llama.tokenizer", "train", "--input", str(data),
                             "--vocab-size", "100", "--out", str(tmp_path / "y")], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.startswith("error: vocab_size 100 is too small")
    assert "Traceback" not in result.stderr
