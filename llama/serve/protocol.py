"""OpenAI's request and response shapes: checking a request's JSON, and writing the answers.

Every bad request becomes an `APIError` (status 4xx, OpenAI's error JSON: {"error": {"message",
"type", "param", "code"}}) naming the field and the fix; the server answers it and keeps serving.
Nothing in a request names a file: the only input is the JSON body.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import List, Optional

from llama.common.errors import UserError


class APIError(UserError):
    def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
                 type: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.param, self.status, self.type, self.code = param, status, type, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Sampling:
    max_tokens: Optional[int]  # None: up to the end of the context
    temperature: float
    top_p: float
    seed: Optional[int]
    stop: List[str]
    stream: bool
    logprobs: bool
    top_logprobs: int
    include_usage: bool = False


@dataclass
class ChatRequest:
    messages: list
    sampling: Sampling
    tools: Optional[list] = None
    tool_choice: object = "auto"
    extra: dict = field(default_factory=dict)


def _typed(body: dict, name: str, kinds, default=None, check=None, fix: str = ""):
    """body[name] if it has one of `kinds` (bool is not a number here) and passes `check`."""
    value = body.get(name, default)
    if value is None:
        return default
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        what = "a number" if float in kinds else {int: "an integer", bool: "a boolean", str: "a string",
                                                   dict: "an object"}[kinds[0]]
        raise APIError(f"'{name}' must be {what}, not {type(value).__name__} {value!r:.40}", name)
    if check is not None and not check(value):
        raise APIError(f"'{name}' = {value!r:.40} is out of range: {fix}", name)
    return value


def sampling(body: dict, max_seq_len: int, default_max_tokens: Optional[int], chat: bool) -> Sampling:
    """The sampling fields every endpoint shares (OpenAI's defaults: temperature 1, top_p 1)."""
    n = _typed(body, "n", int, 1)
    if n != 1:
        raise APIError(f"'n' = {n}: this server returns one choice per request; send several requests", "n")
    limit = max_seq_len - 1
    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    max_tokens = default_max_tokens
    for name in names:
        max_tokens = _typed(body, name, int, max_tokens, lambda v: 1 <= v <= limit,
                            f"ask for 1 to {limit} tokens (the context is {max_seq_len})")
    temperature = _typed(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "use 0 (greedy) to 2")
    top_p = _typed(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "use a value in (0, 1]")
    seed = _typed(body, "seed", int, None)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4 or
                             not all(isinstance(s, str) and s for s in stop)):
        raise APIError("'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    stream = _typed(body, "stream", bool, False)
    options = _typed(body, "stream_options", dict, {})
    if chat:
        logprobs = _typed(body, "logprobs", bool, False)
        top = _typed(body, "top_logprobs", int, 0, lambda v: 0 <= v <= 20, "use 0 to 20")
        if top and not logprobs:
            raise APIError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    else:
        top = _typed(body, "logprobs", int, None, lambda v: 0 <= v <= 5, "use 0 to 5 (null: none)")
        logprobs, top = top is not None, top or 0
    return Sampling(max_tokens, float(temperature), float(top_p), seed, stop or [], stream, logprobs, top,
                    bool(options.get("include_usage")))


def chat_request(body: dict, max_seq_len: int) -> ChatRequest:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool", "ipython"):
            raise APIError(f"messages[{i}] needs a 'role' of system, user, assistant or tool", f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's content parts: text only here
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if content is not None and not isinstance(content, str):
            raise APIError(f"messages[{i}].content must be a string", f"messages[{i}].content")
        if content is None and not (m["role"] == "assistant" and m.get("tool_calls")):
            raise APIError(f"messages[{i}] has no content", f"messages[{i}].content")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({**{k: v for k, v in m.items() if k in ("tool_calls", "tool_call_id", "name")},
                    "role": role, "content": content})
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise APIError("'tools' must be a list of {\"type\": \"function\", \"function\": {...}}", "tools")
    choice = body.get("tool_choice", "auto" if tools else "none")
    if choice == "required":
        raise APIError("tool_choice 'required' needs constrained decoding, which this server does not do: use "
                       "'auto', 'none' or {\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        chosen = [t for t in tools or [] if isinstance(t, dict) and (t.get("function") or {}).get("name") == name]
        if not chosen:
            raise APIError(f"tool_choice names {name!r}, which is not in 'tools'", "tool_choice")
        tools = chosen  # offer the model that tool alone
    elif choice not in ("auto", "none"):
        raise APIError("'tool_choice' must be 'auto', 'none' or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                       "tool_choice")
    return ChatRequest(out, sampling(body, max_seq_len, None, chat=True), None if choice == "none" else tools or None,
                       choice)


def completion_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise APIError("'prompt' must be a non-empty string (one prompt per request)", "prompt")
    if body.get("echo") or body.get("suffix") or (body.get("best_of") or 1) != 1:
        raise APIError("'echo', 'suffix' and 'best_of' are not supported", "echo")
    return prompt


# ---------------------------------------------------------------------------- answers


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_logprobs(tokenizer, events) -> dict:
    """OpenAI's chat logprobs: per token its text, log-probability, bytes and the top alternatives."""
    def entry(i, lp):
        data = tokenizer.decode_bytes([i])
        return {"token": data.decode("utf-8", "replace"), "logprob": lp, "bytes": list(data)}
    return {"content": [{**entry(e.id, e.logprob), "top_logprobs": [entry(i, lp) for i, lp in e.top]}
                        for e in events]}


def completion_logprobs(tokenizer, events, offset: int = 0) -> dict:
    tokens = [tokenizer.decode([e.id]) for e in events]
    offsets = [offset + sum(len(t) for t in tokens[:k]) for k in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in events],
            "top_logprobs": [{tokenizer.decode([i]): lp for i, lp in e.top} for e in events],
            "text_offset": offsets}


def envelope(kind: str, ident: str, model: str, choices: list, **extra) -> dict:
    return {"id": ident, "object": kind, "created": int(time.time()), "model": model, "choices": choices, **extra}
