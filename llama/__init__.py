"""llama-ref: a readable Llama 3.1 you can run, train and read.

The public API, imported on first use: `import llama` loads nothing else (not even torch), so
that an entry point can set what must be set before torch starts (llama/common/threads.py), and so
that `llama.model` never depends on the rest.
"""

__all__ = ["Llama", "ModelArgs", "Transformer", "KVCache", "Tokenizer", "ChatFormat"]


def __getattr__(name):
    if name in ("ModelArgs", "Transformer", "KVCache"):
        from llama import model

        return getattr(model, name)
    if name == "Llama":
        from llama.generation import Llama

        return Llama
    if name in ("Tokenizer", "ChatFormat"):
        from llama import tokenizer

        return getattr(tokenizer, name)
    raise AttributeError(f"module 'llama' has no attribute {name!r}")
