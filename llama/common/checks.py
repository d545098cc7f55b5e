"""Checks of the values that enter the library and its command lines, one per kind of value: a
number in a range (check_number: finite, whole where it must be), a seed, a device, the arguments of
Llama.build, load_model, text_completion and chat_completion. Each raises ArgumentError naming the
argument, the value and the fix. They run where a value is parsed, before any work, so a wrong call
fails in milliseconds with one line, not deep inside with a KeyError or numpy's own message.
"""

import math
import os
from typing import Optional

import torch

from llama.common.errors import ArgumentError

CHAT_ROLES = ("system", "user", "assistant", "ipython", "tool")
SEED_MAX = 2**64 - 1  # torch.manual_seed and numpy's default_rng both take 0 .. 2**64 - 1


def _named(name: str, value) -> str:
    """How a message names a value: `--device 'foo'` for a flag, `lr=nan`, `device=cuda` for a key."""
    shown = repr(value) if isinstance(value, str) else value
    return f"{name} {shown}" if name.startswith("-") else f"{name}={value}"


def _set(name: str, value: str) -> str:
    """What to type: `--device cpu` or `device=cpu`."""
    return f"{name} {value}" if name.startswith("-") else f"{name}={value}"


def _bounds(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    return f"{'<' if high_open else '<='} {high}" if high is not None else ""


def check_number(name: str, value, *, low=None, high=None, low_open: bool = False, high_open: bool = False,
                 integer: bool = False, fix: str = "") -> None:
    """The one rule for a number from a user: a whole number where one is meant (not 2.5, not true),
    finite (not nan or inf), within [low, high] (or an open end). `fix` ends the message."""
    kind = "a whole number" if integer else "a finite number"
    if low == (1 if integer else 0) and (integer or low_open) and high is None:
        kind, low = f"a positive {kind.split(' ', 1)[1]}", None  # "must be a positive whole number"
        low_open = False
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    ok = ok and not isinstance(value, bool) and (integer or math.isfinite(value))
    if ok and "positive" in kind:
        ok = value > 0
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        bounds = _bounds(low, high, low_open, high_open)
        shown = f"{name} {value!r}" if name.startswith("-") else f"{name}={value!r}"  # '128' (a str) shows its quotes
        raise ArgumentError(f"{shown}: must be {kind}{' ' + bounds if bounds else ''}{'; ' + fix if fix else ''}")


def check_seed(name: str, value) -> None:
    check_number(name, value, low=0, high=SEED_MAX, integer=True, fix="any whole number in that range, e.g. 1")


def check_device(value, name: str = "--device", need_it_here: bool = True) -> Optional[torch.device]:
    """A device name as torch.device (None for None/"auto": the caller's default): cpu, cuda or cuda:N.
    With need_it_here, a CUDA device must exist on this machine (a config naming one may be checked
    where it will not run: llama.plan)."""
    if value is None or value == "auto":
        return None
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ArgumentError(f"{_named(name, value)} is not a device: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ArgumentError(f"{_named(name, value)}: only cpu and cuda are supported here")
    if need_it_here and device.type == "cuda":
        if not torch.cuda.is_available():
            raise ArgumentError(f"{_named(name, value)}: no CUDA GPU is available here; use {_set(name, 'cpu')}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ArgumentError(f"{_named(name, value)}: this machine has {torch.cuda.device_count()} GPU(s), "
                                f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return device


def check_positive_int(name: str, value, fix: str) -> None:
    check_number(name, value, low=1, integer=True, fix=fix)


def check_sizes(max_seq_len, max_batch_size) -> None:
    """Llama.build / load_model: the context and batch the model is built for."""
    check_positive_int("max_seq_len", max_seq_len, "the longest prompt + generation in tokens, e.g. 2048")
    check_positive_int("max_batch_size", max_batch_size, "the most prompts per call, e.g. 4")


def check_max_gen_len(max_gen_len) -> None:
    """None means 'up to the context'; anything else is a number of tokens, at least 1."""
    if max_gen_len is not None:
        check_positive_int("max_gen_len", max_gen_len, "or None to generate up to max_seq_len")


def check_prompts(prompts) -> None:
    """text_completion's prompts: a list of strings (a bare str would be one prompt per character)."""
    if isinstance(prompts, str):
        raise ArgumentError("prompts is a str: pass a list of prompts, e.g. text_completion([\"Hello\"])")
    if not isinstance(prompts, (list, tuple)):
        raise ArgumentError(f"prompts is a {type(prompts).__name__}: pass a list of strings")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ArgumentError(f"prompts[{i}] is a {type(p).__name__}: each prompt must be a str "
                                f"(token ids go to generate())")
        if not p:
            raise ArgumentError(f"prompts[{i}] is '': give some text to complete (an unconditional sample: "
                                f"generate([[tokenizer.bos_id]], ...))")


def check_dialogs(dialogs) -> None:
    """chat_completion's dialogs: a list of dialogs, each a list of {"role", "content"} messages (an
    assistant message with "tool_calls" may have no content, as in OpenAI's API)."""
    example = '[[{"role": "user", "content": "Hi"}]]'
    if not isinstance(dialogs, (list, tuple)):
        raise ArgumentError(f"dialogs is a {type(dialogs).__name__}: pass a list of dialogs, e.g. {example}")
    for i, dialog in enumerate(dialogs):
        if not isinstance(dialog, (list, tuple)):
            raise ArgumentError(f"dialogs[{i}] is a {type(dialog).__name__}: each dialog is a list of messages, "
                                f"e.g. {example}")
        if not dialog:
            raise ArgumentError(f"dialogs[{i}] is []: a dialog needs at least one message, e.g. {example}")
        for j, message in enumerate(dialog):
            where = f"dialogs[{i}][{j}]"
            if not isinstance(message, dict):
                raise ArgumentError(f"{where} is a {type(message).__name__}: a message is a dict with 'role' "
                                    f"and 'content'")
            calls = message.get("role") == "assistant" and message.get("tool_calls")
            missing = [k for k in ("role", "content") if k not in message and not (k == "content" and calls)]
            if missing:
                raise ArgumentError(f"{where} has no {missing[0]!r}: a message is "
                                    f'{{"role": "user", "content": "..."}}')
            if message["role"] not in CHAT_ROLES:
                raise ArgumentError(f"{where} has role {message['role']!r}: use one of {', '.join(CHAT_ROLES)}")
            if not isinstance(message.get("content"), str) and not (calls and message.get("content") is None):
                raise ArgumentError(f"{where}'s content is a {type(message['content']).__name__}: it must be a str")


def memory_bytes(device: Optional[torch.device]) -> int:
    """Total memory of the device the model goes to (RAM for the CPU)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no estimate, no refusal
        return 1 << 62


def check_context_fits(args, dtype: torch.dtype, device, source) -> None:
    """Refuse a max_seq_len whose RoPE table plus the KV cache of one sequence of that length cannot
    fit in the device's memory at all: --max-seq-len 1000000000 fails here in a millisecond instead
    of allocating tens of GB first. (A request's cache is sized to the request, so this is the
    floor of what max_seq_len promises, not an estimate of every request.)"""
    device = torch.device(device) if device is not None else None
    elem = torch.empty((), dtype=dtype).element_size()
    per_token = 2 * args.n_layers * args.n_kv_heads * args.head_dim * elem + args.head_dim * 4  # K, V; RoPE
    need, have = per_token * args.max_seq_len, memory_bytes(device)
    if need > have:
        fits = have // per_token
        raise ArgumentError(f"max_seq_len={args.max_seq_len}: one sequence that long needs {need / 2**30:.0f} GiB "
                            f"for {source}'s KV cache, more than the {have / 2**30:.0f} GiB here: use at most "
                            f"{fits} (e.g. --max-seq-len {min(fits, 8192)})")
