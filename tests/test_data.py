"""llama/data/prepare.py and llama/train/batches.py: prepare, shards, splits, per-rank batches, SFT masks."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llama.data import prepare as data
from llama.train.batches import IGNORE, Batches, best_fit_decreasing, next_fit
from llama.data.prepare import DataError, encode_dialog, prepare, read_meta
from llama.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def bpe(corpus):
    return corpus[1]


def test_prepare_text_dir_and_jsonl(bpe, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/a.txt").write_text("first document\nwith two lines")
    (tmp_path / "docs/.hidden.txt").write_text("never read")
    (tmp_path / "b.md").write_text("second document")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "third"}) + "\n\n" + json.dumps({"text": "fourth é"}) + "\n")
    out = prepare([str(tmp_path / "docs"), str(tmp_path / "b.md"), str(tmp_path / "c.jsonl")], tmp_path / "out",
                  bpe, val_fraction=0.25)
    meta = read_meta(out)
    tok = load_tokenizer(bpe)
    stream = np.fromfile(out / "tokens_000.bin", dtype=np.uint32)
    assert meta["n_tokens"] == len(stream) and meta["n_documents"] == 4 and meta["kind"] == "pretrain"
    assert meta["tokenizer"]["n_words"] == tok.n_words == 640
    # Every document is BOS text EOS; decoding the pieces gives the texts back (files in a fixed shuffle).
    bos = np.flatnonzero(stream == tok.bos_id)
    docs = [tok.decode(stream[s + 1 : e - 1].tolist()) for s, e in zip(bos, list(bos[1:]) + [len(stream)])]
    assert all(stream[e - 1] == tok.eos_id for e in list(bos[1:]) + [len(stream)])
    assert sorted(docs) == sorted(["first document\nwith two lines", "second document",
                                                       "third", "fourth é"])
    assert meta["val_start"] == len(stream) - int(np.ceil(len(stream) * 0.25))


def test_bad_data_errors(bpe, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare([str(tmp_path / "missing")], tmp_path / "o", bpe)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="holds no text"):
        prepare([str(tmp_path / "empty.txt")], tmp_path / "o", bpe)
    assert not (tmp_path / "o").exists()
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "oops"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2 has no 'text' field"):
        prepare([str(tmp_path / "bad.jsonl")], tmp_path / "o", bpe)
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match="no assistant message"):
        prepare([str(tmp_path / "chat.jsonl")], tmp_path / "o", bpe, sft=True)
    with pytest.raises(DataError, match="not a prepared data directory"):
        read_meta(tmp_path)


def test_shards_read_as_one_stream(bpe, corpus, tmp_path, monkeypatch):
    data_dir, _ = corpus
    monkeypatch.setattr(data, "SHARD_TOKENS", 1000)  # many small shard files instead of one
    sharded = prepare(read_meta(data_dir)["sources"], tmp_path / "sharded", bpe, val_fraction=0.1)
    meta = read_meta(sharded)
    assert len(meta["shards"]) == -(-meta["n_tokens"] // 1000) > 5
    one, many = Batches(data_dir, 32, seed=3), Batches(sharded, 32, seed=3)
    for consumed in (0, 8, 16 * 999):  # the last one is many epochs in
        a = one.train_micro_batches(consumed, 8, 8, 0, 1)[0]
        b = many.train_micro_batches(consumed, 8, 8, 0, 1)[0]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_windows_epochs_and_ranks(corpus):
    data_dir, _ = corpus
    meta = read_meta(data_dir)
    b = Batches(data_dir, 32, seed=0)
    assert len(b) == (meta["val_start"] - 1) // 32
    stream = np.concatenate([np.fromfile(data_dir / s["file"], dtype=np.uint32) for s in meta["shards"]])
    x, y = b.collate([b._sequence(5, "train")])
    assert torch.equal(x[0], torch.from_numpy(stream[160:192].astype(np.int64)))  # window 5: tokens 160..192
    assert torch.equal(y[0], torch.from_numpy(stream[161:193].astype(np.int64)))  # targets: shifted by one
    # One epoch visits every window once; the next epoch in another order.
    epoch = [b._train_index(g) for g in range(len(b))]
    assert sorted(epoch) == list(range(len(b)))
    assert [b._train_index(len(b) + g) for g in range(len(b))] != epoch
    # Data-parallel ranks split each global batch; together they are exactly the one-rank batch.
    whole = torch.cat([x for x, _ in b.train_micro_batches(24, 8, 2, 0, 1)])
    parts = [torch.cat([x for x, _ in b.train_micro_batches(24, 8, 2, r, 2)]) for r in range(2)]
    assert torch.equal(torch.cat(parts), whole)
    # Validation windows come from the held-out tail only.
    val = torch.cat([x for x, _ in b.val_micro_batches(1, 8, 8, 0, 1)])
    assert torch.equal(val[0], torch.from_numpy(stream[meta["val_start"] : meta["val_start"] + 32].astype(np.int64)))


def test_sft_mask_on_a_known_llama3_dialog(llama3_tokenizer_path):
    """The loss covers each assistant reply's content and its <|eot_id|>, nothing else."""
    tok = load_tokenizer(llama3_tokenizer_path)
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
              {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"},
              {"role": "assistant", "content": "Rome."}]
    tokens, mask = encode_dialog(tok, dialog)
    BOS, SH, EH, EOT, NN = 128000, 128006, 128007, 128009, 271  # Meta's ids; 271 is "\n\n"

    def msg(role, text):
        return [SH, *tok.encode(role, bos=False, eos=False), EH, NN], [*tok.encode(text, bos=False, eos=False), EOT]

    expected, expected_mask = [BOS], [0]
    for m in dialog:
        head, body = msg(m["role"], m["content"])
        expected += head + body
        expected_mask += [0] * len(head) + [int(m["role"] == "assistant")] * len(body)
    assert tokens == expected and mask == expected_mask
    trained = [t for t, m in zip(tokens, mask) if m]
    assert tok.decode(trained) == "Paris.<|eot_id|>Rome.<|eot_id|>"
    # The prompt a chat model sees at inference is the same token sequence up to the reply.
    prompt = tok.chat_format.encode_dialog_prompt(dialog[:2])
    assert tokens[: len(prompt)] == prompt


def test_sft_mask_chatml(smollm2_gguf):
    """SmolLM2 (ChatML, a default system prompt, no BOS): same rule, found from the format itself."""
    tok = load_tokenizer(smollm2_gguf)
    dialog = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"}]
    tokens, mask = encode_dialog(tok, dialog)
    prompt = tok.chat_format.encode_dialog_prompt(dialog[:1])
    assert tokens[: len(prompt)] == prompt and not any(mask[: len(prompt)])  # system + user + header: untrained
    assert tok.decode([t for t, m in zip(tokens, mask) if m]).startswith("Hello, how can I help?<|im_end|>")


def test_sft_batches_mask_targets(bpe, tmp_path):
    dialogs = [[{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i} " * (i + 1)}]
               for i in range(10)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": d}) + "\n" for d in dialogs))
    out = prepare([str(tmp_path / "chat.jsonl")], tmp_path / "sft", bpe, sft=True, val_fraction=0.2)
    meta = read_meta(out)
    assert meta["kind"] == "sft" and meta["val_document_start"] == 8
    tok = load_tokenizer(bpe)
    b = Batches(out, 64, seed=0)
    assert b.counts == {"train": 8, "val": 2}
    x, y = b.collate([b._sequence(3, "train"), b._sequence(0, "train")])  # padded to the longer dialog
    for row, i in enumerate((3, 0)):
        tokens, mask = encode_dialog(tok, dialogs[i])
        n = len(tokens) - 1
        assert x[row, :n].tolist() == tokens[:-1]
        want = [t if m else IGNORE for t, m in zip(tokens[1:], mask[1:])]
        assert y[row, :n].tolist() == want and (y[row, n:] == IGNORE).all()
        assert tok.decode([t for t in want if t != IGNORE]) == dialogs[i][1]["content"].strip() + "<|eot_id|>"


def test_packing_sft_rows_keep_each_dialog_whole_with_its_own_targets(bpe, tmp_path):
    """packing=true: every training dialog lands in exactly one row of at most seq_len inputs, with the
    inputs and masked targets it has alone and positions from 0; far fewer rows than dialogs."""
    dialogs = [[{"role": "user", "content": f"count to {i}"}, {"role": "assistant", "content": " ".join(map(str, range(i)))}]
               for i in range(1, 41)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": d}) + "\n" for d in dialogs))
    out = prepare([str(tmp_path / "chat.jsonl")], tmp_path / "sft", bpe, sft=True, val_fraction=0.1)
    packed, plain = Batches(out, 512, seed=0, packing=True), Batches(out, 512, seed=0)
    assert sorted(int(d) for row in packed.rows["train"] for d in row) == list(range(36))
    assert sorted(int(d) for row in packed.rows["val"] for d in row) == list(range(4))  # held-out dialogs 36-39
    filled = sum(len(packed._packed(i, "train")[0]) for i in range(packed.counts["train"]))
    assert filled / (512 * packed.counts["train"]) > 0.75, packed.counts  # fills most of each row
    lengths = np.minimum(np.diff(packed.offsets), 513)[:36] - 1  # (36,) every training dialog's inputs
    assert packed.counts["train"] == -(-lengths.sum() // 512) == 5  # the fewest rows that can hold them
    assert len(next_fit(lengths, 512)) == 6  # (next-fit, in file order, needs one more)
    again = Batches(out, 512, seed=0, packing=True)
    assert [r.tolist() for r in again.rows["train"]] == [r.tolist() for r in packed.rows["train"]]  # reproducible
    for index, row in enumerate(packed.rows["train"]):
        x, y, pos = packed._packed(index, "train")
        assert len(x) <= 512 and len(x) == len(y) == len(pos)
        starts = np.flatnonzero(pos == 0).tolist() + [len(x)]
        assert len(starts) - 1 == len(row)
        for doc, a, b in zip(row, starts, starts[1:]):
            want_x, want_y = plain.collate([plain._sequence(int(doc), "train")])
            assert x[a:b].tolist() == want_x[0].tolist() and y[a:b].tolist() == want_y[0].tolist()
            assert pos[a:b].tolist() == list(range(b - a))
    x, y, pos = packed.train_micro_batches(0, 4, 2, 1, 2)[0]  # a micro-batch: padded rows, padding untrained
    assert x.shape == y.shape == pos.shape and x.shape[0] == 2


def test_best_fit_decreasing_fills_rows_window_by_window():
    """The longest first, each into the fullest row with room for it: 8 and 2 share a row, 7 and 3
    another (next-fit in order needs 3 rows); windows of one row's worth pack {3, 8} and {2, 7} apart."""
    lengths = np.array([3, 8, 2, 7])
    assert [r.tolist() for r in next_fit(lengths, 10)] == [[0], [1, 2], [3]]
    assert [r.tolist() for r in best_fit_decreasing(lengths, 10)] == [[1, 2], [0, 3]]
    assert [r.tolist() for r in best_fit_decreasing(lengths, 10, window=1)] == [[1], [0], [2, 3]]
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 400, 3000)
    rows = best_fit_decreasing(lengths, 512, window=8)
    assert sorted(i for r in rows for i in r.tolist()) == list(range(3000))  # every item once
    assert max(int(lengths[r].sum()) for r in rows) <= 512
    assert len(rows) < 0.9 * len(next_fit(lengths, 512))
    window = (np.cumsum(lengths) - lengths) // (8 * 512)
    assert all(len(set(window[r].tolist())) == 1 for r in rows)  # a row never mixes windows
    assert [int(window[r[0]]) for r in rows] == sorted(int(window[r[0]]) for r in rows)  # rows window by window


def test_packing_pretraining_positions_restart_at_each_document(corpus, tmp_path):
    data_dir, _ = corpus
    packed, plain = Batches(data_dir, 32, seed=0, packing=True), Batches(data_dir, 32, seed=0)
    offsets = np.load(data_dir / "offsets.npy")
    crossing = 0
    for index in range(len(plain)):
        x, y, pos = packed._packed(index, "train")
        want_x, want_y = plain.collate([plain._sequence(index, "train")])
        assert x.astype(np.int64).tolist() == want_x[0].tolist() and y.astype(np.int64).tolist() == want_y[0].tolist()
        at = np.arange(index * 32, index * 32 + 32)
        starts = [max(index * 32, int(offsets[offsets <= t].max())) for t in at]  # the definition, token by token
        assert pos.tolist() == (at - np.array(starts)).tolist()
        crossing += int((pos[1:] == 0).any())
    assert crossing > 5  # windows that hold a document boundary
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in data_dir.iterdir():
        if f.name != "offsets.npy":
            (bare / f.name).symlink_to(f)
    with pytest.raises(DataError, match="no offsets.npy .* prepare it again"):
        Batches(bare, 32, seed=0, packing=True)


def test_prepare_cli_trains_a_tokenizer(tmp_path, capsys):
    import textwrap

    (tmp_path / "t.txt").write_text(Path(textwrap.__file__).read_text())
    assert data.main(["prepare", str(tmp_path / "t.txt"), "--out", str(tmp_path / "d"), "--vocab-size", "600"]) == 0
    assert (tmp_path / "d/tokenizer.model").is_file() and read_meta(tmp_path / "d")["tokenizer"]["n_words"] == 600
    assert data.main(["prepare", str(tmp_path / "nope"), "--out", str(tmp_path / "e"), "--tokenizer",
                      str(tmp_path / "d/tokenizer.model")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_prepared_data_trains_only_with_the_tokenizer_that_made_it(bpe, smollm2_gguf, llama3_tokenizer_path, tmp_path):
    """A prepared dir holds one tokenizer's ids: train.py refuses another tokenizer, and the recorded
    one once its file has changed; the same tokenizer in another format (a .gguf's tokenizer.json) passes."""
    import shutil

    from llama.tokenizer import save_tokenizer
    from llama.train.setup import resolve_data
    from tests.helpers import tiny_config

    (tmp_path / "t.txt").write_text("Some text to tokenize.\n" * 20)
    tok = tmp_path / "bpe.model"
    shutil.copy(bpe, tok)
    prepared = prepare([str(tmp_path / "t.txt")], tmp_path / "d", tok)
    assert resolve_data(tiny_config(prepared, tmp_path / "run"), 640) == (prepared, str(tok.resolve()))
    with pytest.raises(DataError, match=r"d was tokenized by .*bpe\.model, not by .*tokenizer\.model \(another"):
        resolve_data(tiny_config(prepared, tmp_path / "run", f"tokenizer={llama3_tokenizer_path}"), 128256)
    tok.write_bytes(Path(llama3_tokenizer_path).read_bytes())  # the file retrained or replaced in place
    with pytest.raises(DataError, match=r"bpe\.model \(sha256 \w+\), which has changed since, and .*: prepare it again"):
        resolve_data(tiny_config(prepared, tmp_path / "run"), 640)
    smol = prepare([str(tmp_path / "t.txt")], tmp_path / "s", smollm2_gguf)
    (tmp_path / "hf").mkdir()
    save_tokenizer(smollm2_gguf, tmp_path / "hf")  # the GGUF's tokenizer as tokenizer.json: other bytes, same ids
    data.check_tokenizer(smol, read_meta(smol), tmp_path / "hf" / "tokenizer.json")
