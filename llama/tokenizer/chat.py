"""Chat formats: how a dialog becomes the token ids a chat model was fine-tuned on.

A dialog is a list of {"role": ..., "content": ...} dicts (roles: system, user, assistant, and
for Llama 3 also ipython/tool). Every format has the same two methods:

    encode_message(message)       -> ids of one finished message
    encode_dialog_prompt(dialog)  -> ids of the whole dialog, ending in an open assistant turn
                                     (the model writes the reply and ends it with a stop token)

Three formats, one per model family:
- `ChatFormat` (Llama 3 / 3.1, Meta's name): <|start_header_id|>role<|end_header_id|>\\n\\n text <|eot_id|>
- `Llama2ChatFormat`: [INST] <<SYS>>\\n system \\n<</SYS>>\\n\\n user [/INST] answer </s><s>[INST] ...
- `ChatMLFormat` (SmolLM2, Qwen, ...): <|im_start|>role\\ncontent<|im_end|>\\n

Special tokens are always inserted by id, and message text is encoded as plain text, so a user who
types "<|eot_id|>" cannot end a turn early.
"""

from __future__ import annotations

Message = dict  # {"role": str, "content": str}
Dialog = list  # list[Message]


class ChatFormat:
    """Llama 3 / 3.1 chat format, ids identical to Meta's `ChatFormat`.

    Content is stripped of surrounding whitespace as in Meta's llama3 repository (and HF's Llama 3
    chat template, `| trim`); role "tool" is written as "ipython" like llama-models does.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode_header(self, message: Message) -> list[int]:
        role = "ipython" if message["role"] == "tool" else message["role"]
        special = self.tokenizer.special_tokens
        return [
            special["<|start_header_id|>"],
            *self.tokenizer.encode(role, bos=False, eos=False),
            special["<|end_header_id|>"],
            *self.tokenizer.encode("\n\n", bos=False, eos=False),
        ]

    def encode_message(self, message: Message) -> list[int]:
        tokens = self.encode_header(message)
        tokens.extend(self.tokenizer.encode(message["content"].strip(), bos=False, eos=False))
        tokens.append(self.tokenizer.special_tokens["<|eot_id|>"])
        return tokens

    def encode_dialog_prompt(self, dialog: Dialog) -> list[int]:
        tokens = [self.tokenizer.special_tokens["<|begin_of_text|>"]]
        for message in dialog:
            tokens.extend(self.encode_message(message))
        # The start of an assistant message, for the model to complete.
        tokens.extend(self.encode_header({"role": "assistant", "content": ""}))
        return tokens


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
