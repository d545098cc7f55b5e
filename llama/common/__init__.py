"""What every part of the package shares, each a leaf module that imports no other part of llama:

    errors.py   UserError, the one base class every command line catches, and report()
    files.py    atomic writes, output folders that never destroy an input
    checks.py   the checks of arguments entering the public API (Llama.build, load_model, ...)
    dtypes.py   the one table of dtype names
    threads.py  CPU threads and how they wait, for entry points (imports no torch)
    flops.py    model FLOPs per token and the GPU datasheet table (planner and training MFU)
    gguf_header.py  the metadata and tensor index of a GGUF file (weights and tokenizers read it)
    assets.py   real assets from pip packages (SmolLM2 GGUF, Llama 3 tokenizer, evaluation data)

Nothing is imported here, so that `llama.common.threads` can run before torch is loaded.
"""
