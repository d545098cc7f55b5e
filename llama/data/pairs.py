"""Preference pairs for DPO (llama/train/dpo.py): one jsonl line per pair, tokenized once.

    {"prompt": "What is 7 km in m?", "chosen": "7000 m", "rejected": "700 m"}
    {"messages": [{"role": "system", ...}, {"role": "user", ...}], "chosen": "...", "rejected": "..."}
    {"prompt": [{"role": "user", "content": ...}], "chosen": [{"role": "assistant", "content": ...}], ...}

The prompt is a user message (a string) or a dialog (a list of messages, under "prompt" or
"messages"); each response is the assistant's reply, a string or TRL's one-message list. Both are
written in the model's chat format, as TRL's DPOTrainer writes them with the model's chat template:
the prompt is the dialog with the assistant header opened (what generation is given), each
response is what the whole dialog with that reply adds after it (the reply and its end-of-turn).

    python -m llama.data prepare prefs.jsonl --pairs --tokenizer smollm2 --out data/prefs

A prepared pair is two sequences in the SFT layout (llama/data/prepare.py): prompt + chosen, then
prompt + rejected, each with its mask 1 on the response tokens only; `origins.npy` keeps each pair's
source file, line and prompt length, so a pair that does not fit seq_len is named by its line.
"""

from pathlib import Path
from typing import Iterator, List, Tuple

from llama.data.records import DataError, check_dialog, common_prefix, encode_dialog, jsonl_records

KEYS = '{"prompt" or "messages", "chosen", "rejected"}'


def _reply(value, key: str, where: str) -> str:
    """A response's text: a string, or a list holding one assistant message (TRL's conversational form)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        if value[0].get("role") != "assistant" or not isinstance(value[0].get("content"), str):
            raise DataError(f"{where}: {key!r} must be the assistant's reply: a string or "
                            f"[{{\"role\": \"assistant\", \"content\": ...}}]")
        value = value[0]["content"]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string or [{{\"role\": \"assistant\", \"content\": ...}}], "
                        f"got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: {key!r} is empty: a pair needs two non-empty replies (fix or remove the line)")
    return value


def check_pair(record, where: str) -> Tuple[List[dict], str, str]:
    """(prompt dialog, chosen text, rejected text) of one jsonl record, or a DataError naming the line."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object {KEYS}, got {type(record).__name__}")
    if ("prompt" in record) == ("messages" in record):
        what = "both" if "prompt" in record else "neither"
        raise DataError(f"{where}: has {what} of 'prompt' and 'messages': give one (expected {KEYS} per line)")
    for key in ("chosen", "rejected"):
        if key not in record:
            raise DataError(f"{where}: has no {key!r} field (expected {KEYS} per line)")
    prompt = record["prompt"] if "prompt" in record else record["messages"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        check_dialog(prompt, where, reply=False)
    else:
        raise DataError(f"{where}: the prompt must be a string or a list of messages, got {type(prompt).__name__}")
    chosen, rejected = _reply(record["chosen"], "chosen", where), _reply(record["rejected"], "rejected", where)
    if chosen.strip() == rejected.strip():
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same reply: a pair must differ "
                        f"(fix or remove the line)")
    return prompt, chosen, rejected


def encode_pair(tokenizer, prompt: List[dict], chosen: str, rejected: str) -> Tuple[List[int], List[int], List[int]]:
    """(prompt ids, chosen ids, rejected ids) in the model's chat format. The prompt is the dialog
    with the assistant header opened; a response is what the whole dialog with that reply adds after
    the longest prefix it shares with the prompt (TRL's rule, so a merge across the boundary cannot
    put a prompt token into a response)."""
    start = tokenizer.chat_format.encode_dialog_prompt(prompt)
    whole = [encode_dialog(tokenizer, prompt + [{"role": "assistant", "content": reply}])[0]
             for reply in (chosen, rejected)]
    n = min(common_prefix(start, w) for w in whole)
    return start[:n], whole[0][n:], whole[1][n:]


def iter_pairs(files: List[Path]) -> Iterator[Tuple[int, int, Tuple[List[dict], str, str]]]:
    """(file index, line number, checked pair) for every non-empty line of the .jsonl files."""
    for i, f in enumerate(files):
        if f.suffix != ".jsonl":
            raise DataError(f"{f}: preference data must be .jsonl lines of {KEYS}")
        for n, record in jsonl_records(f):
            yield i, n, check_pair(record, f"{f}:{n}")
