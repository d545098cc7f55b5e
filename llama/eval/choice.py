"""Multiple choice by loglikelihood (HellaSwag / ARC / MMLU style) on a jsonl of
{"context": str, "choices": [str, ...], "label": int}.

Each choice is scored as the continuation `separator + choice` of the context (lm-evaluation-harness's
target_delimiter, " " by default), tokenized the way lm-eval does: the context and the whole text
are encoded, and the continuation is what the whole adds. accuracy picks the highest total
log-probability; length-normalised accuracy divides by the choice's UTF-8 bytes (lm-eval's
acc_bytes; its acc_norm divides by characters, the same for ASCII).
"""

import json
import time
from pathlib import Path
from typing import List, Tuple

from llama.eval import EvalError
from llama.eval.perplexity import prefix_token
from llama.eval.scoring import score_requests


def read_items(path) -> List[dict]:
    """The items of a choice jsonl, each checked; a bad line raises EvalError naming its number."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: no such file: pass a jsonl of {{\"context\", \"choices\", \"label\"}} lines")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            items.append(check_item(line, f"{path}:{n}"))
    if not items:
        raise EvalError(f"{path}: the file is empty: add {{\"context\", \"choices\", \"label\"}} lines")
    return items


def check_item(line: str, where: str) -> dict:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise EvalError(f"{where}: not valid JSON ({e.msg}): fix or remove the line") from None
    if not isinstance(item, dict):
        raise EvalError(f"{where}: expected a JSON object with context, choices and label")
    if not isinstance(item.get("context"), str):
        raise EvalError(f"{where}: no \"context\" string: add the question text")
    choices = item.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise EvalError(f"{where}: \"choices\" must be a list of at least 2 non-empty strings")
    label = item.get("label")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise EvalError(f"{where}: \"label\" {label!r} is out of range: give the index (0..{len(choices) - 1}) "
                        "of the right choice")
    return item


def encode_pair(tokenizer, context: str, continuation: str) -> Tuple[List[int], List[int]]:
    """lm-eval's TemplateLM._encode_pair: trailing spaces move to the continuation; the
    continuation's tokens are what encoding the whole adds to encoding the context. The prefix
    token goes first."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    encode = lambda s: tokenizer.encode(s, bos=False, eos=False)  # noqa: E731
    ctx = encode(context) if context else []
    whole = encode(context + continuation)
    return [prefix_token(tokenizer)] + ctx, whole[len(ctx):]


def loglikelihood_requests(pairs: List[Tuple[List[int], List[int]]], max_seq_len: int):
    """(tokens, n_targets) requests for (context, continuation) token pairs, keeping the end of
    sequences longer than the model's context (as lm-eval does)."""
    requests = []
    for ctx, cont in pairs:
        whole = (ctx + cont)[-(max_seq_len + 1):]
        requests.append((whole, min(len(cont), len(whole) - 1)))
    return requests


def score_items(model, tokenizer, items: List[dict], batch_size: int = 8, separator: str = " ") -> dict:
    """Accuracy, length-normalised accuracy and per-item scores for checked items."""
    pairs, owners = [], []
    for i, item in enumerate(items):
        for c in item["choices"]:
            pairs.append(encode_pair(tokenizer, item["context"], separator + c))
            owners.append(i)
    start = time.perf_counter()
    scores = score_requests(model, loglikelihood_requests(pairs, model.params.max_seq_len), batch_size)
    seconds = time.perf_counter() - start
    per_item = [dict(index=i, label=item["label"], logprobs=[], per_byte=[]) for i, item in enumerate(items)]
    for (lp, _), i in zip(scores, owners):
        per_item[i]["logprobs"].append(float(lp.double().sum()))
    for rec, item in zip(per_item, items):
        rec["per_byte"] = [s / len(c.encode("utf-8")) for s, c in zip(rec["logprobs"], item["choices"])]
        rec["pred"] = max(range(len(rec["logprobs"])), key=rec["logprobs"].__getitem__)
        rec["pred_norm"] = max(range(len(rec["per_byte"])), key=rec["per_byte"].__getitem__)
        rec["correct"], rec["correct_norm"] = rec["pred"] == rec["label"], rec["pred_norm"] == rec["label"]
    n = len(items)
    return {"acc": sum(r["correct"] for r in per_item) / n, "acc_norm": sum(r["correct_norm"] for r in per_item) / n,
            "items": n, "seconds": seconds, "per_item": per_item}


def write_per_item(path, items: List[dict], result: dict) -> None:
    """One jsonl line per item: the item, the scores and the prediction, to look at the misses."""
    with open(path, "w", encoding="utf-8") as f:
        for item, rec in zip(items, result["per_item"]):
            f.write(json.dumps({**item, **rec}) + "\n")
