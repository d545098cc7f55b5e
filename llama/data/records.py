"""Chat jsonl, from a line to tokens: records read and checked, dialogs written in the model's chat
format with the mask of what is trained (SFT: llama/data/prepare.py; preference pairs:
llama/data/pairs.py). The data package's error class lives here, at the bottom of its imports."""

import json
from pathlib import Path
from typing import Iterator, List, Tuple

from llama.common.checks import CHAT_ROLES
from llama.common.errors import UserError


class DataError(UserError):
    """Bad or missing data: the message names the file and the fix."""


def jsonl_records(path: Path) -> Iterator[Tuple[int, object]]:
    """(line number, parsed JSON) for every non-empty line of a jsonl file; a line that is not UTF-8
    is named by its number and first bad byte."""
    with open(path, "rb") as lines:
        for n, raw in enumerate(lines, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n} is not UTF-8 text (byte 0x{raw[e.start]:02x}): convert the file to "
                                f"UTF-8") from None
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n} is not valid JSON ({e.msg})") from None


def check_dialog(messages, where: str, reply: bool = True) -> None:
    """A list of {"role", "content"} strings; with `reply`, one of them the assistant's (SFT learns from it)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: each message needs a string 'role' and 'content'")
        if m["role"] not in CHAT_ROLES:  # the chat format would encode any header: a typo would train as-is
            raise DataError(f"{where}: role {m['role']!r} is not a chat role: use one of {', '.join(CHAT_ROLES)}")
    if reply and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the dialog has no assistant message to learn from")


def common_prefix(a: List[int], b: List[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def dialog_frame(chat_format) -> Tuple[List[int], List[int]]:
    """(start, header): what the format puts before the first message (BOS, a default system
    message) and the open assistant turn it ends a prompt with. Found by comparing two prompts,
    [] -> start + header and [user] -> start + encode_message(user) + header, so any format that
    builds prompts from encode_message (Llama 3, ChatML) works without knowing its tokens."""
    user = {"role": "user", "content": "Hi"}
    empty = chat_format.encode_dialog_prompt([])
    probe = chat_format.encode_dialog_prompt([user])
    message = chat_format.encode_message(user)
    for k in range(len(empty), -1, -1):
        if probe[:k] == empty[:k] and probe[k : k + len(message)] == message:
            return empty[:k], empty[k:]
    raise DataError(f"cannot find where messages go in {type(chat_format).__name__}'s prompts")


def encode_dialog(tokenizer, messages: List[dict]) -> Tuple[List[int], List[int]]:
    """Tokens of a whole dialog in the model's chat format (as its prompts are built at inference
    time), and a 0/1 mask that is 1 exactly on each assistant reply after its role header: the
    reply's content and its end-of-turn token, so the model learns to answer and to stop, never
    to predict the user's words, the system prompt or the headers."""
    chat = tokenizer.chat_format
    _, header = dialog_frame(chat)
    try:
        pieces = [chat.encode_message(message) for message in messages]
    except ValueError as e:  # Llama 2 encodes a reply only together with its question
        raise DataError(f"SFT needs a chat format that encodes one message at a time "
                        f"(Llama 3, ChatML): {e}") from None
    # What goes before the first message depends on the dialog (SmolLM2's template adds its default
    # system message only to a dialog that has none): take it from the prompt the format builds.
    prompt = chat.encode_dialog_prompt(messages)
    n = len(prompt) - len(header) - sum(map(len, pieces))
    tokens, mask = prompt[:n], [0] * n
    for message, piece in zip(messages, pieces):
        untrained = common_prefix(piece, header) if message["role"] == "assistant" else len(piece)
        tokens += piece
        mask += [0] * untrained + [1] * (len(piece) - untrained)
    if tokens + header != prompt:
        raise DataError(f"{type(chat).__name__} does not build its prompts from its messages: SFT needs a format "
                        f"that does (Llama 3, ChatML)")
    return tokens, mask
