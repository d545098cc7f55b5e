"""Generation: Meta's API and the opt-in machinery that makes it fast.

    generator.py  Llama.build, generate, text_completion, chat_completion: prefill, decode steps, sampling
    sampling.py   temperature, top-k, top-p
    compile.py    the compiled decode step and allocator tuning (opt-in: compile=True)
    quantize.py   weight-only int8 / int4 in groups (opt-in: quantize=...), C++ kernel in csrc/
    cli.py        generate.py's command line and chat REPL

`from llama.generation import Llama` works (and every other name of generator.py, as when this was one
file); they load on first use, so importing one of the modules above does not build the others.
"""

import importlib

__all__ = ["Llama", "Token", "Stats", "cache_slot"]


def __getattr__(name):
    if name.startswith("__"):  # import machinery asking for __path__ etc.: not ours to answer
        raise AttributeError(name)
    generator = importlib.import_module("llama.generation.generator")
    try:
        return getattr(generator, name)
    except AttributeError:
        raise AttributeError(f"module 'llama.generation' has no attribute {name!r}") from None
