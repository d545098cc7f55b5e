"""Chat models in evaluation: which checkpoints are chat models, and chat data scored the way a chat
model reads it (the assistant's replies given the dialog, in the model's own chat format).

A checkpoint is a chat model when (the first rule that applies, in this order):
1. it is a training checkpoint (a step dir or a run's out_dir, LoRA runs included) of a run with
   `sft=true`: it was trained on dialogs in its chat format;
2. its tokenizer files carry a chat template (GGUF `tokenizer.chat_template`, HF `chat_template` in
   tokenizer_config.json or chat_template.jinja), the mark HF transformers and llama.cpp read; a
   fine-tune inherits its base's tokenizer files, and a LoRA run is judged by its base;
3. it is a Meta directory named `...Instruct` (Meta's downloads: the Instruct and base models share
   one tokenizer.model, so the name is the only mark).
"""

import itertools
import json
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from llama.checkpoint import default_tokenizer_path, detect_format
from llama.checkpoint.gguf import GGUFFile
from llama.checkpoint.load import resolve
from llama.checkpoint.peft import recorded_base
from llama.data.prepare import DataError, encode_dialog, iter_documents
from llama.eval import EvalError
from llama.eval.perplexity import PerplexityResult
from llama.eval.scoring import score_requests


def chat_reason(ckpt, lora=None) -> Optional[str]:
    """Why `ckpt` (with the adapter `lora` merged) is a chat model, a few words for the report; None
    when it is not one."""
    if lora is not None and trained_on_chats(resolve(lora)):
        return "trained on chats (sft=true)"
    path = resolve(ckpt)
    if trained_on_chats(path):
        return "trained on chats (sft=true)"
    base = recorded_base(path)
    if base is not None:  # a LoRA checkpoint: judged by its base
        reason = chat_reason(base)
        return reason and f"its base is a chat model: {reason}"
    tokenizer = default_tokenizer_path(path)
    if tokenizer is not None and has_chat_template(Path(tokenizer)):
        return "its tokenizer has a chat template"
    if detect_format(path) == "meta" and "instruct" in (path.name + path.parent.name).lower():
        return "a Meta Instruct model"
    return None


def trained_on_chats(path: Path) -> bool:
    """A training checkpoint (llama/train/state.py) of an sft=true run."""
    if not (path.is_dir() and (path / "train_state.00.pth").is_file()):
        return False
    # mmap: only the pickled config is read, not the optimizer state beside it
    state = torch.load(path / "train_state.00.pth", map_location="cpu", mmap=True, weights_only=True)
    return bool(state.get("config", {}).get("sft"))


def has_chat_template(tokenizer: Path) -> bool:
    if tokenizer.suffix == ".gguf":
        return bool(GGUFFile(tokenizer).metadata.get("tokenizer.chat_template"))
    folder = tokenizer.parent
    if (folder / "chat_template.jinja").is_file():
        return True
    config = folder / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))


def is_chat_data(source: str) -> bool:
    """A .jsonl file whose first record holds "messages": dialogs, scored as chats."""
    path = Path(source)
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict) and "messages" in json.loads(first)
    except json.JSONDecodeError:
        return False


def read_chats(source: str, limit: Optional[int] = None) -> List[list]:
    """The dialogs of a chat jsonl (checked as train.py checks SFT data), the first `limit` of them."""
    try:
        dialogs = list(iter_documents([Path(source)], sft=True))
    except DataError as e:
        raise EvalError(str(e)) from None
    if not dialogs:
        raise EvalError(f"{source}: no dialogs in the file: one {{\"messages\": [...]}} per line")
    return dialogs[:limit]


def user_prompts(dialogs: List[list], n: int) -> List[str]:
    """The first user message of the first n dialogs that have one: prompts in the data's own domain."""
    firsts = [next((m["content"] for m in d if m["role"] == "user"), None) for d in dialogs]
    return [p for p in firsts if p][:n]


def chat_requests(tokenizer, dialogs: List[list], max_seq_len: int) -> Tuple[List[Tuple[List[int], int]], int]:
    """One scoring request per assistant reply: the dialog up to the reply's end, the reply's tokens the
    targets: its content and end-of-turn token, as HF's chat templates mark a reply. (SFT's mask,
    llama/data/prepare.py, also covers what a format writes after the end-of-turn token, ChatML's
    newline: left out here.) A dialog longer than the context keeps its end. Returns (requests, UTF-8
    bytes of the replies)."""
    requests, n_bytes, limit = [], 0, max_seq_len + 1
    stops = set(getattr(tokenizer, "stop_tokens", ()))
    for dialog in dialogs:
        tokens, mask = encode_dialog(tokenizer, dialog)
        start = 0
        for trained, run in itertools.groupby(mask):  # runs of 1s: the replies
            end = start + len(list(run))
            if trained:
                last = max((i for i in range(start, end) if tokens[i] in stops), default=end - 1)
                requests.append((tokens[: last + 1][-limit:], min(last + 1 - start, limit - 1)))
            start = end
        n_bytes += sum(len(m["content"].encode("utf-8")) for m in dialog if m["role"] == "assistant")
    return requests, n_bytes


def chat_perplexity(model, tokenizer, dialogs: List[list], batch_size: int = 8, progress: Optional[str] = None) \
        -> PerplexityResult:
    """Perplexity of the assistant replies of `dialogs`, each given the dialog before it, in the
    model's chat format: what an SFT run lowers (its validation loss is the log of this, on its split)."""
    requests, n_bytes = chat_requests(tokenizer, dialogs, model.params.max_seq_len)
    if not requests:
        raise EvalError("the dialogs have no assistant replies to score")
    start = time.perf_counter()
    scores = score_requests(model, requests, batch_size, progress=progress)
    nll = -sum(float(lp.double().sum()) for lp, _ in scores)
    length = model.params.max_seq_len
    return PerplexityResult(nll, sum(n for _, n in requests), n_bytes, time.perf_counter() - start, length, length)
