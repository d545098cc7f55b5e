"""llama/eval/pairs.py (`python -m llama.eval pairs`, compare --pairs): the pair accuracy's
log-probabilities are the ones DPO trains on, exact match compares the greedy chat reply, bad files
are one line."""

import json

import pytest
import torch

from llama.common import assets
from llama.data.prepare import prepare
from llama.eval import EvalError
from llama.eval.cli import main as eval_main
from llama.eval.pairs import exact_match, pair_accuracy, read_pairs
from llama.generation import Llama
from llama.model import ModelArgs, Transformer
from llama.tokenizer import load_tokenizer
from llama.train import dpo
from llama.train.batches import Batches
from tests.helpers import run_main

PAIRS = [{"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"},
         {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Italy?"}],
          "chosen": "Rome.", "rejected": "Milan, I believe."},
         {"prompt": "Convert 4 km to m.", "chosen": "4 km = 4000 m", "rejected": "4 km = 400 m"}]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small random model with SmolLM2's vocabulary and chat format, and the pairs as a file."""
    root = tmp_path_factory.mktemp("eval-pairs")
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=49152, hidden_dim=96,
                                  rope_theta=10000.0, max_seq_len=96, max_batch_size=2))
    model.init_weights(7)
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return Llama(model, load_tokenizer(str(assets.smollm2_gguf()))), root


def test_pair_log_probabilities_are_the_ones_dpo_trains_on(small):
    """The evaluation scorer (llama/eval/scoring.py: only the reply positions through the head) and
    DPO's training path (prepared pairs, collated rows, vocabulary-parallel cross-entropy) agree per pair."""
    llama, root = small
    result = pair_accuracy(llama.model, llama.tokenizer, read_pairs(root / "pairs.jsonl"), batch_size=2)
    data = prepare([str(root / "pairs.jsonl")], root / "data", str(assets.smollm2_gguf()), pairs=True, val_fraction=0)
    x, y = Batches(data, 95, seed=0).micro_batch(range(len(PAIRS)), "train")
    with torch.no_grad():
        chosen, rejected = dpo.response_logps(llama.model, x, y)[0].chunk(2)
    ours = torch.tensor([[r["logp_chosen"], r["logp_rejected"]] for r in result["per_item"]])
    torch.testing.assert_close(ours, torch.stack([chosen, rejected], dim=1), atol=1e-4, rtol=1e-6)
    assert result["pair_acc"] == pytest.approx(float((chosen > rejected).float().mean()))


def test_exact_match_compares_the_greedy_chat_reply(small):
    llama, root = small
    pairs = read_pairs(root / "pairs.jsonl")
    first = exact_match(llama, pairs, max_gen_len=6)  # batches of 2 and 1 (max_batch_size=2)
    replies = [r["reply"] for r in first["per_item"]]
    assert first["exact_match"] == 0.0 and all(replies)  # a random model's replies are not the answers
    # with its own greedy replies (padded by spaces) as the chosen ones, every pair matches
    result = exact_match(llama, [(p, f" {reply}  ", r) for (p, _, r), reply in zip(pairs, replies)], max_gen_len=6)
    assert result["exact_match"] == 1.0 and [r["reply"] for r in result["per_item"]] == replies


def test_bad_pair_files_are_one_line(tmp_path):
    with pytest.raises(EvalError, match="no such file"):
        read_pairs(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(EvalError, match="the file is empty"):
        read_pairs(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    res = run_main(eval_main, "pairs", "--data", tmp_path / "bad.jsonl")
    assert res.returncode == 1 and res.stderr.strip() == f"error: {tmp_path / 'bad.jsonl'}:1: has no 'rejected' field " \
        f"(expected {{\"prompt\" or \"messages\", \"chosen\", \"rejected\"}} per line)"


def test_compare_pairs_equals_the_pairs_scores(small, tmp_path, capsys):
    """compare --pairs: the pair accuracy and exact match the pairs scorers give the same model."""
    from llama.checkpoint import save_meta

    llama, root = small
    save_meta(llama.model.state_dict(), llama.model.params, tmp_path / "ckpt")
    (tmp_path / "prompts.txt").write_text("Hi\n")
    pairs = read_pairs(root / "pairs.jsonl")
    want = (pair_accuracy(llama.model, llama.tokenizer, pairs, batch_size=2)["pair_acc"],
            exact_match(llama, pairs, max_gen_len=6)["exact_match"])
    code = eval_main(["compare", str(tmp_path / "ckpt"), "--pairs", str(root / "pairs.jsonl"), "--no-general",
                      "--prompts", str(tmp_path / "prompts.txt"), "--tokenizer-path", str(assets.smollm2_gguf()),
                      "--max-gen-len", "6", "--max-seq-len", "96", "--max-length", "32", "--batch-size", "2", "--out", str(tmp_path / "rep")])
    err = capsys.readouterr().err
    assert code == 0, err
    scores = json.loads((tmp_path / "rep/scores.json").read_text())["models"][0]["scores"]
    assert code == 0 and (scores["pairs"]["acc"], scores["pairs-exact"]["acc"]) == pytest.approx(want, abs=1e-9)
    assert scores["pairs"]["items"] == len(PAIRS) and "your pairs: pairs.jsonl" in (tmp_path / "rep/report.md").read_text()
