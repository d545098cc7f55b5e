"""llama-ref: a readable Llama 3.1 you can run, train and read.

The public API. `Llama`, `Tokenizer` and `ChatFormat` are imported on first use so that
`import llama` stays cheap and `llama.model` never depends on the rest.
"""

from llama.model import KVCache, ModelArgs, Transformer

__all__ = ["Llama", "ModelArgs", "Transformer", "KVCache", "Tokenizer", "ChatFormat"]


def __getattr__(name):
    if name == "Llama":
        from llama.generation import Llama

        return Llama
    if name in ("Tokenizer", "ChatFormat"):
        from llama import tokenizer

        return getattr(tokenizer, name)
    raise AttributeError(f"module 'llama' has no attribute {name!r}")
