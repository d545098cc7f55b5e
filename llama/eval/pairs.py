"""Preference pairs as an evaluation: does the model prefer the chosen reply, and does it write it?

    python -m llama.eval pairs --data heldout.jsonl                  # SmolLM2-135M-Instruct
    python -m llama.eval pairs --data heldout.jsonl --ckpt-dir out/dpo --out scored.jsonl   # a (LoRA) run

The data is DPO's (llama/data/pairs.py): jsonl of {"prompt" or "messages", "chosen", "rejected"}.
- pair accuracy: the share of pairs whose chosen reply has the higher log-probability given the
  prompt, summed over the reply's tokens and its end-of-turn (DPO's log pi(y | x)), the tokens
  exactly as training prepares them;
- exact match: the share of prompts whose greedy reply in the model's chat format (temperature 0,
  up to the end of turn or max_gen_len tokens) is the chosen reply, up to surrounding whitespace.
  The output is compared as text, never executed.
"""

import json
import time
from pathlib import Path
from typing import List, Tuple

from llama.data.pairs import check_pair, encode_pair
from llama.data.records import DataError, jsonl_records
from llama.eval import EvalError
from llama.eval.scoring import score_requests

Pair = Tuple[List[dict], str, str]  # (prompt dialog, chosen, rejected)


def read_pairs(path) -> List[Pair]:
    """The checked pairs of a jsonl file; a bad line is an EvalError naming it."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: no such file: pass a jsonl of {{\"prompt\", \"chosen\", \"rejected\"}} lines")
    try:
        pairs = [check_pair(record, f"{path}:{n}") for n, record in jsonl_records(path)]
    except DataError as e:
        raise EvalError(str(e)) from None
    if not pairs:
        raise EvalError(f"{path}: the file is empty: add {{\"prompt\", \"chosen\", \"rejected\"}} lines")
    return pairs


def pair_accuracy(model, tokenizer, pairs: List[Pair], batch_size: int = 8) -> dict:
    """Share of pairs whose chosen reply is the likelier one, and each pair's two log-probabilities."""
    requests = []
    for pair in pairs:
        prompt, chosen, rejected = encode_pair(tokenizer, *pair)
        requests += [(prompt + chosen, len(chosen)), (prompt + rejected, len(rejected))]
    scores = [float(lp.double().sum()) for lp, _ in score_requests(model, requests, batch_size)]
    per_item = [{"logp_chosen": scores[2 * i], "logp_rejected": scores[2 * i + 1],
                 "prefers_chosen": scores[2 * i] > scores[2 * i + 1]} for i in range(len(pairs))]
    return {"pair_acc": sum(r["prefers_chosen"] for r in per_item) / len(pairs), "pairs": len(pairs),
            "per_item": per_item}


def exact_match(llama, pairs: List[Pair], max_gen_len: int = 32) -> dict:
    """Share of prompts whose greedy chat reply is the chosen reply (stripped), and the replies."""
    batch = llama.model.params.max_batch_size
    replies = []
    for start in range(0, len(pairs), batch):
        dialogs = [prompt for prompt, _, _ in pairs[start : start + batch]]
        out = llama.chat_completion(dialogs, max_gen_len=max_gen_len, temperature=0.0, truncate=True)
        replies += [o["generation"]["content"] for o in out]
    hits = [reply.strip() == chosen.strip() for reply, (_, chosen, _) in zip(replies, pairs)]
    return {"exact_match": sum(hits) / len(pairs), "per_item": [{"reply": r, "exact": h} for r, h in zip(replies, hits)]}


def score_pairs(llama, pairs: List[Pair], batch_size: int = 8, max_gen_len: int = 32) -> dict:
    """Both scores; per_item joins them."""
    start = time.perf_counter()
    likelihood = pair_accuracy(llama.model, llama.tokenizer, pairs, batch_size)
    generation = exact_match(llama, pairs, max_gen_len)
    per_item = [{**a, **b} for a, b in zip(likelihood["per_item"], generation["per_item"])]
    return {"pair_acc": likelihood["pair_acc"], "exact_match": generation["exact_match"], "pairs": len(pairs),
            "seconds": time.perf_counter() - start, "per_item": per_item}


def write_per_item(path, pairs: List[Pair], result: dict) -> None:
    from llama.common.files import write_text

    lines = [json.dumps({"prompt": p, "chosen": c, "rejected": r, **rec})
             for (p, c, r), rec in zip(pairs, result["per_item"])]
    write_text(path, "".join(line + "\n" for line in lines))
