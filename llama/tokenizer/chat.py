"""Chat formats: how a dialog becomes the token ids a chat model was fine-tuned on.

A dialog is a list of {"role": ..., "content": ...} dicts (roles: system, user, assistant, and
for Llama 3 also ipython/tool). Every format has the same two methods:

    encode_message(message)       -> ids of one finished message
    encode_dialog_prompt(dialog)  -> ids of the whole dialog, ending in an open assistant turn
                                     (the model writes the reply and ends it with a stop token)

Four formats:
- `ChatFormat` (Llama 3 / 3.1, Meta's name): <|start_header_id|>role<|end_header_id|>\\n\\n text <|eot_id|>,
  with Llama 3.1's tool calling (llama/tokenizer/tools.py): encode_dialog_prompt(dialog, tools=...,
  today=...) and decode_assistant_message(ids, stop_token) -> a message with tool_calls
- `HFLlama31Format`: the same, as HF's Llama 3.1 chat template (tokenizer_config.json) renders it
- `Llama2ChatFormat`: [INST] <<SYS>>\\n system \\n<</SYS>>\\n\\n user [/INST] answer </s><s>[INST] ...
- `ChatMLFormat` (SmolLM2, Qwen, ...): <|im_start|>role\\ncontent<|im_end|>\\n

Special tokens are always inserted by id, and message text is encoded as plain text, so a user who
types "<|eot_id|>" (or "<|python_tag|>") cannot end a turn early or fake a tool call.
"""

from __future__ import annotations

import json
import re

from llama.common.errors import ArgumentError
from llama.tokenizer.tools import (KNOWLEDGE_CUTOFF, TOOL_PROMPT_FORMATS, call_text, custom_tools_message,
                                   openai_tool_call, parse_tool_call, system_block, tool_calls_of,
                                   tool_definitions)

Message = dict  # {"role": str, "content": str} (+ "tool_calls", "stop_reason" for an assistant)
Dialog = list  # list[Message]


class ChatFormat:
    """Llama 3 / 3.1 chat format, as Meta's llama-models (prompt_format.md) writes it.

    User, system and assistant content is stripped of surrounding whitespace as in Meta's llama3
    repository (and HF's template, `| trim`); a tool's output ("ipython", or "tool" as OpenAI calls
    it) is written as given, as in prompt_format.md. An assistant message with `tool_calls` (OpenAI's
    or Meta's shape) is written as the model writes the call and ends with <|eom_id|> when the call
    follows <|python_tag|> (a message's "stop_reason" overrides this, as in llama-models).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = tokenizer.special_tokens

    def encode_header(self, message: Message) -> list[int]:
        role = "ipython" if message["role"] == "tool" else message["role"]
        return [self.special["<|start_header_id|>"], *self.tokenizer.encode(role, bos=False, eos=False),
                self.special["<|end_header_id|>"], *self.tokenizer.encode("\n\n", bos=False, eos=False)]

    def _encode(self, role: str, text: str, end: str = "<|eot_id|>", python_tag: bool = False) -> list[int]:
        tag = [self.special["<|python_tag|>"]] if python_tag else []
        return [*self.encode_header({"role": role}), *tag, *self.tokenizer.encode(text, bos=False, eos=False),
                self.special[end]]

    def encode_message(self, message: Message, tool_prompt_format: str = "json", tools=()) -> list[int]:
        role, content = message["role"], message.get("content") or ""
        if role in ("ipython", "tool"):
            return self._encode(role, self.tool_result_text(content))
        calls = tool_calls_of(message, "message") if role == "assistant" else []
        text = content.strip()
        python_tag = False
        for i, (_, name, arguments) in enumerate(calls):
            tagged, call = self.call_text(name, arguments, tool_prompt_format)
            python_tag = python_tag or (i == 0 and tagged)
            text += call
        stop = message.get("stop_reason")
        eom = stop == "end_of_message" if stop is not None else python_tag
        return self._encode(role, text, "<|eom_id|>" if eom else "<|eot_id|>", python_tag)

    def call_text(self, name: str, arguments: dict, tool_prompt_format: str) -> tuple[bool, str]:
        return call_text(name, arguments, tool_prompt_format)

    def tool_result_text(self, content) -> str:
        return content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)

    def encode_dialog_prompt(self, dialog: Dialog, tools=None, tool_prompt_format: str = "json",
                             today: str | None = None) -> list[int]:
        """The dialog's ids, ending in an open assistant turn. With `tools` (see tools.tool_definitions)
        or `today` ("21 September 2024"), the system message becomes Meta's system block (and the
        user-defined tools' instructions a user message after it, in `tool_prompt_format`)."""
        if tool_prompt_format not in TOOL_PROMPT_FORMATS:
            raise ArgumentError(f"tool_prompt_format={tool_prompt_format!r}: use one of {', '.join(TOOL_PROMPT_FORMATS)}")
        tokens, dialog = [self.special["<|begin_of_text|>"]], list(dialog)
        tools = tool_definitions(tools)
        tokens += self.encode_system(dialog, tools, tool_prompt_format, today)
        for message in dialog:
            tokens.extend(self.encode_message(message, tool_prompt_format, tools))
        tokens.extend(self.encode_header({"role": "assistant"}))  # the reply the model writes
        return tokens

    def encode_system(self, dialog: Dialog, tools: list, tool_prompt_format: str, today) -> list[int]:
        """Meta's system block and tool instructions (taking the dialog's system message); nothing
        (the dialog's own messages say everything) without tools or a date."""
        if not tools and today is None:
            return []
        system = dialog.pop(0).get("content", "").strip() if dialog and dialog[0]["role"] == "system" else None
        tokens = self._encode("system", system_block(tools, today, system))
        instructions = custom_tools_message(tools, tool_prompt_format)
        return tokens + (self._encode("user", instructions) if instructions else [])

    def decode_assistant_message(self, tokens: list[int], stop_token: int | None = None,
                                 parse_calls: bool = True) -> Message:
        """A generated reply (ids without the stop token) -> {"role": "assistant", "content",
        "tool_calls" (OpenAI's shape, [] for none), "stop_reason"}. stop_reason is Meta's name:
        end_of_message (<|eom_id|>: a tool's result is awaited), end_of_turn, or out_of_tokens (the
        length limit cut the reply). Calls are read by llama-models' rules (tools.parse_tool_call); with
        parse_calls=False (no tools were offered) only a reply opening with <|python_tag|> is read."""
        tokens = list(tokens)
        python_tag = bool(tokens) and tokens[0] == self.special.get("<|python_tag|>")
        content = self.tokenizer.decode(tokens[1:] if python_tag else tokens)  # as written (streaming shows this)
        call = parse_tool_call(content.strip(" "), python_tag) if (python_tag or parse_calls) else None
        return {"role": "assistant", "content": "" if call else content,
                "tool_calls": [openai_tool_call(*call)] if call else [], "stop_reason": self.stop_reason(stop_token)}

    def stop_reason(self, stop_token: int | None) -> str:
        if stop_token is None:
            return "out_of_tokens"
        return "end_of_message" if stop_token == self.special.get("<|eom_id|>") else "end_of_turn"


class HFLlama31Format(ChatFormat):
    """Llama 3.1 as HF's chat template (Meta-Llama-3.1-8B-Instruct's tokenizer_config.json) renders it,
    chosen when a checkpoint's template is that one (an HF directory or a GGUF): every prompt opens
    with a system block holding the dates (`date_string`, the template's default "26 Jul 2024");
    user-defined tools go into the first user message as JSON schemas; a call is written
    {"name": ..., "parameters": ...} ending <|eot_id|>, a built-in's with <|python_tag|> ending
    <|eom_id|>; a tool's output is written as JSON (a string quoted), as the template does."""

    def __init__(self, tokenizer, date_string: str = "26 Jul 2024"):
        super().__init__(tokenizer)
        self.date_string = date_string

    def encode_system(self, dialog: Dialog, tools: list, tool_prompt_format: str, today) -> list[int]:
        system = dialog.pop(0).get("content", "").strip() if dialog and dialog[0]["role"] == "system" else ""
        builtin, custom = [t.name for t in tools if t.builtin], [t for t in tools if not t.builtin]
        text = "Environment: ipython\n" if tools else ""
        if builtin:
            text += "Tools: " + ", ".join(n for n in builtin if n != "code_interpreter") + "\n\n"
        text += f"Cutting Knowledge Date: {KNOWLEDGE_CUTOFF}\nToday Date: {today or self.date_string}\n\n{system}"
        tokens = self._encode("system", text)
        if custom:
            if not dialog:
                raise ArgumentError("tools need a first user message to go into: add one to the dialog")
            first = dialog.pop(0).get("content", "").strip()
            schemas = "".join(json.dumps(t.schema, indent=4, ensure_ascii=False) + "\n\n" for t in custom)
            tokens += self._encode("user", "Given the following functions, please respond with a JSON for a "
                                   "function call with its proper arguments that best answers the given prompt.\n\n"
                                   'Respond in the format {"name": function name, "parameters": dictionary of '
                                   "argument name and its value}.Do not use variables.\n\n" + schemas + first)
        return tokens

    def encode_message(self, message: Message, tool_prompt_format: str = "json", tools=()) -> list[int]:
        if message["role"] != "assistant" or not message.get("tool_calls"):
            return super().encode_message({k: v for k, v in message.items() if k != "stop_reason"})
        calls = tool_calls_of(message, "message")
        if len(calls) != 1:
            raise ArgumentError(f"HF's Llama 3.1 template takes exactly one tool call per message, not {len(calls)}")
        _, name, arguments = calls[0]
        builtin = [t.name for t in tools if t.builtin]
        if name in builtin:
            call = name + ".call(" + ", ".join(f'{k}="{v}"' for k, v in arguments.items()) + ")"
            return self._encode("assistant", call, "<|eom_id|>", python_tag=True)
        call = f'{{"name": "{name}", "parameters": {json.dumps(arguments, ensure_ascii=False)}}}'
        return self._encode("assistant", call, "<|eom_id|>" if builtin else "<|eot_id|>")

    def tool_result_text(self, content) -> str:
        return json.dumps(content, ensure_ascii=False)  # the template's `tojson`, strings included


def hf_template_format(tokenizer, template: str):
    """The chat format an HF chat template asks for, where we know it: HF's Llama 3.1 template (its
    system block names a knowledge cutoff) -> HFLlama31Format with the template's default date."""
    if "Cutting Knowledge Date" in template and "<|start_header_id|>" in template:
        m = re.search(r'set date_string = "([^"]+)"', template)
        return HFLlama31Format(tokenizer, m.group(1) if m else "26 Jul 2024")
    return ChatFormat(tokenizer)


# Llama 2's format, from Meta's llama repository (generation.py, chat_completion).
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


class Llama2ChatFormat:
    """Llama 2 chat: each (user, assistant) pair is one `<s>[INST] q [/INST] a </s>` string.

    A system message is folded into the first user message between <<SYS>> markers. Because a user
    turn and its answer are tokenized together (sentencepiece adds a leading space per call),
    `encode_message` only encodes a user turn on its own (with BOS, ending in [/INST]).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode_message(self, message: Message) -> list[int]:
        if message["role"] != "user":
            raise ValueError(
                f"Llama 2 encodes an {message['role']!r} message together with its user turn: "
                "use encode_dialog_prompt(dialog) instead"
            )
        return self.tokenizer.encode(f"{B_INST} {message['content'].strip()} {E_INST}", bos=True, eos=False)

    def encode_dialog_prompt(self, dialog: Dialog) -> list[int]:
        if dialog and dialog[0]["role"] == "system":
            if len(dialog) < 2:
                raise ValueError("a Llama 2 dialog needs a user message after the system message")
            merged = B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]
            dialog = [{"role": dialog[1]["role"], "content": merged}] + list(dialog[2:])
        roles = [m["role"] for m in dialog]
        if not dialog or roles[-1] != "user" or any(
            r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles)
        ):
            raise ValueError(
                f"a Llama 2 dialog must be [system], user, assistant, user, ..., user; got roles {roles}"
            )
        tokens: list[int] = []
        for prompt, answer in zip(dialog[:-1:2], dialog[1::2]):
            text = f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} "
            tokens.extend(self.tokenizer.encode(text, bos=True, eos=True))
        tokens.extend(self.encode_message(dialog[-1]))
        return tokens


class ChatMLFormat:
    """ChatML: `<|im_start|>role\\ncontent<|im_end|>\\n` per message (SmolLM2's chat template).

    `default_system` is the system message the model's template inserts when a dialog has none
    (SmolLM2: "You are a helpful AI assistant named SmolLM, trained by Hugging Face"); `bos` is
    prepended only when the model's own convention adds one.
    """

    def __init__(self, tokenizer, default_system: str | None = None):
        self.tokenizer = tokenizer
        self.default_system = default_system
        self.im_start = tokenizer.special_tokens["<|im_start|>"]
        self.im_end = tokenizer.special_tokens["<|im_end|>"]

    def encode_message(self, message: Message) -> list[int]:
        text = self.tokenizer.encode(f"{message['role']}\n{message['content']}", bos=False, eos=False)
        return [self.im_start, *text, self.im_end, *self.tokenizer.encode("\n", bos=False, eos=False)]

    def encode_dialog_prompt(self, dialog: Dialog) -> list[int]:
        tokens = [self.tokenizer.bos_id] if self.tokenizer.add_bos and self.tokenizer.bos_id is not None else []
        if self.default_system is not None and (not dialog or dialog[0]["role"] != "system"):
            tokens.extend(self.encode_message({"role": "system", "content": self.default_system}))
        for message in dialog:
            tokens.extend(self.encode_message(message))
        tokens.append(self.im_start)
        tokens.extend(self.tokenizer.encode("assistant\n", bos=False, eos=False))
        return tokens
