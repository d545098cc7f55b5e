"""Multiple choice by loglikelihood (HellaSwag / ARC / MMLU style) on a jsonl of
{"context": str, "choices": [str, ...], "label": int}.

Each choice is scored as the continuation `separator + choice` of the context (lm-evaluation-harness's
target_delimiter, " " by default), tokenized as lm-eval does (llama/eval/scoring.encode_pair). The
metrics are lm-eval's: `acc` picks the highest total log-probability, `acc_norm` the highest per
character of the choice, `acc_bytes` the highest per UTF-8 byte (the same as acc_norm for ASCII).
"""

import json
import time
from pathlib import Path
from typing import List, Optional, Tuple

from llama.common.files import read_text_file, write_text
from llama.eval import EvalError
from llama.eval.scoring import encode_pair, score_requests


def read_items(path) -> List[dict]:
    """The items of a choice jsonl, each checked; a bad line raises EvalError naming its number."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: no such file: pass a jsonl of {{\"context\", \"choices\", \"label\"}} lines")
    items = []
    for n, line in enumerate(read_text_file(path, "--data").splitlines(), 1):
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


def loglikelihood_requests(pairs: List[Tuple[List[int], List[int]]], max_seq_len: int):
    """(tokens, n_targets) requests for (context, continuation) token pairs, keeping the end of
    sequences longer than the model's context (as lm-eval does)."""
    requests = []
    for ctx, cont in pairs:
        whole = (ctx + cont)[-(max_seq_len + 1):]
        requests.append((whole, min(len(cont), len(whole) - 1)))
    return requests


def score_items(model, tokenizer, items: List[dict], batch_size: int = 8, separator: str = " ",
                progress: Optional[str] = None) -> dict:
    """acc, acc_norm (per character), acc_bytes (per byte) and per-item scores for checked items."""
    pairs, owners = [], []
    for i, item in enumerate(items):
        for c in item["choices"]:
            pairs.append(encode_pair(tokenizer, item["context"], separator + c))
            owners.append(i)
    start = time.perf_counter()
    scores = score_requests(model, loglikelihood_requests(pairs, model.params.max_seq_len), batch_size, progress)
    seconds = time.perf_counter() - start
    per_item = [dict(index=i, label=item["label"], logprobs=[]) for i, item in enumerate(items)]
    for (lp, _), i in zip(scores, owners):
        per_item[i]["logprobs"].append(float(lp.double().sum()))
    best = lambda xs: max(range(len(xs)), key=xs.__getitem__)  # noqa: E731  the first of equal scores
    for rec, item in zip(per_item, items):
        rec["per_char"] = [s / len(c) for s, c in zip(rec["logprobs"], item["choices"])]
        rec["per_byte"] = [s / len(c.encode("utf-8")) for s, c in zip(rec["logprobs"], item["choices"])]
        rec["pred"], rec["pred_norm"], rec["pred_bytes"] = best(rec["logprobs"]), best(rec["per_char"]), best(rec["per_byte"])
        rec["correct"], rec["correct_norm"], rec["correct_bytes"] = (
            rec["pred"] == rec["label"], rec["pred_norm"] == rec["label"], rec["pred_bytes"] == rec["label"])
    n = len(items)
    mean = lambda key: sum(r[key] for r in per_item) / n  # noqa: E731
    return {"acc": mean("correct"), "acc_norm": mean("correct_norm"), "acc_bytes": mean("correct_bytes"),
            "items": n, "seconds": seconds, "per_item": per_item}


def write_per_item(path, items: List[dict], result: dict) -> None:
    """One jsonl line per item: the item, the scores and the prediction, to look at the misses.
    Written atomically: a full disk leaves the previous file, not a truncated one."""
    write_text(path, "".join(json.dumps({**item, **rec}) + "\n" for item, rec in zip(items, result["per_item"])))
