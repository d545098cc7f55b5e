"""Convert weights between formats.

    python -m llama.convert SRC DST --to {meta,hf} [--shards N] [--dtype bf16|fp16|fp32|bfloat16|...] [--lora ADAPTER]

SRC is a Meta dir (any number of shards), an HF dir or a .gguf file. The weights are loaded whole
in this one process (memory-mapped, so about one copy of them), then written:
  --to meta   params.json + consolidated.00..N-1.pth, loadable here at any model-parallel size
              and by Meta's own code at model-parallel size N;
  --to hf     config.json + safetensors (q/k permuted for HF's rotate-half RoPE), for transformers.
The source's tokenizer is carried along as small files (tokenizer.model, or tokenizer.json with
tokenizer_config.json / chat_template.jinja; a GGUF's tokenizer is extracted into those), and the
source's context length is kept (config.json max_position_embeddings, params.json context_length).
DST must be new or empty (--overwrite replaces it); it appears complete or not at all.
--lora merges a LoRA adapter (PEFT dir or LoRA training checkpoint) first: W += (alpha/r) B A.
"""

import argparse
import sys
from pathlib import Path


from llama import checkpoint
from llama.checkpoint import peft
from llama.common.dtypes import DTYPES, parse_dtype
from llama.common.errors import USER_ERRORS, report
from llama.common.checks import check_number
from llama.common.files import add_output_argument, atomic_dir, check_output_dir, copy_file
from llama.checkpoint.gguf import GGUFFile
from llama.tokenizer import check_vocab, load_tokenizer, save_tokenizer


def convert(src, dst, to: str, shards: int = 1, dtype=None, overwrite: bool = False, lora=None) -> Path:
    """Load `src` (any format), merge the LoRA adapter `lora` if given, write `dst` as `to` ('meta'/'hf').

    dst is built in a temporary sibling and renamed into place (llama/common/files.py): a failure or Ctrl-C
    leaves no partial files and an existing dst as it was. An existing non-empty dst is refused
    unless `overwrite`, and even then never when it is (or contains) src or the working directory."""
    check_number("--shards", shards, low=1, integer=True, fix="the number of consolidated.NN.pth files")
    src, dst = checkpoint.resolve(src), Path(dst)
    if to not in ("meta", "hf"):
        raise checkpoint.CheckpointError(f"--to {to!r}: choose meta or hf")
    if to == "hf" and shards != 1:
        raise checkpoint.CheckpointError("--shards applies to --to meta; HF files are split by size")
    source_dir = src if src.is_dir() else src.parent
    if dst.resolve() == source_dir.resolve():
        raise checkpoint.CheckpointError(f"{dst}: the destination is the source directory: pick a new directory")
    if lora is not None:
        peft.find_adapter(lora)  # before any loading or writing
    # Every input is protected, --overwrite or not: the weights, the adapter (and its run folder).
    check_output_dir(dst, overwrite, [src, lora], name="DST")  # first: a refused DST costs nothing
    tok = checkpoint.default_tokenizer_path(src)
    tokenizer = carried_tokenizer(tok)
    with atomic_dir(dst, overwrite, [src, lora], name="DST") as tmp:
        model = checkpoint.load_model(src, dtype=dtype)
        if lora is not None:
            peft.merge_adapter(model, lora, src)
        state = model.state_dict()
        if to == "meta":
            checkpoint.save_meta(state, model.params, tmp, num_shards=shards)
        else:
            checkpoint.save_hf(state, model.params, tmp)
        if tokenizer is not None:
            check_vocab(tokenizer, model.params.vocab_size)  # ids past the embedding table: refused, not written
        if tok is not None:  # the tokenizer travels along (a GGUF's is extracted into tokenizer.json)
            save_tokenizer(tok, tmp)
        if src.is_dir() and (src / "generation_config.json").is_file():
            copy_file(src / "generation_config.json", tmp / "generation_config.json")
    return dst


def carried_tokenizer(tok):
    """The source's tokenizer, loaded before anything is written: one that would not load (a GGUF
    whose token list disagrees with its merges or specials) fails now, naming the source, not at
    generate time on the copy. None for no tokenizer, or a weights-only GGUF (no tokenizer model)."""
    if tok is None:
        return None
    if Path(tok).suffix == ".gguf" and "tokenizer.ggml.model" not in GGUFFile(tok).metadata:
        return None
    return load_tokenizer(tok)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="Meta checkpoint dir, HF dir or .gguf file")
    add_output_argument(parser, "dst", kind="dir", help="output directory (a new or empty one, unless --overwrite)")
    parser.add_argument("--to", required=True, choices=["meta", "hf"])
    parser.add_argument("--shards", type=int, default=1, help="number of consolidated.NN.pth files (--to meta)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="bf16|bfloat16, fp16|float16, fp32|float32 "
                        "(default: keep the source's)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing DST directory (never SRC, nor the working directory)")
    parser.add_argument("--lora", metavar="ADAPTER", help="merge this LoRA adapter (PEFT dir or LoRA checkpoint)")
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.dst, args.to, args.shards, parse_dtype(args.dtype), args.overwrite, args.lora)
    except KeyboardInterrupt:
        print(f"interrupted: {args.dst} is as it was before", file=sys.stderr)
        return 130
    except USER_ERRORS as e:  # anything else is a bug and keeps its traceback
        return report(e)
    print(f"wrote {args.to} checkpoint to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
