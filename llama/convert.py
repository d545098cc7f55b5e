"""Convert weights between formats.

    python -m llama.convert SRC DST --to {meta,hf} [--shards N] [--dtype bf16|fp16|fp32] [--lora ADAPTER]

SRC is a Meta dir (any number of shards), an HF dir or a .gguf file. The weights are loaded whole
in this one process (memory-mapped, so about one copy of them), then written:
  --to meta   params.json + consolidated.00..N-1.pth, loadable here at any model-parallel size
              and by Meta's own code at model-parallel size N;
  --to hf     config.json + safetensors (q/k permuted for HF's rotate-half RoPE), for transformers.
--lora merges a LoRA adapter (PEFT dir or LoRA training checkpoint) first: W += (alpha/r) B A.
Tokenizer files found next to SRC (tokenizer.model, tokenizer.json, ...) are copied along.
"""

import argparse
import shutil
import sys
from pathlib import Path

import torch

from llama import checkpoint, peft_io
from llama.errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOKENIZER_FILES = ["tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json"]


def convert(src, dst, to: str, shards: int = 1, dtype=None, lora=None) -> Path:
    """Load `src` (any format), merge the LoRA adapter `lora` if any, write `dst` as `to` ('meta'/'hf')."""
    src, dst = Path(src), Path(dst)
    if dst.resolve() == (src if src.is_dir() else src.parent).resolve():
        raise checkpoint.CheckpointError(f"{dst}: the destination is the source directory: pick a new directory")
    if lora is not None:
        peft_io.find_adapter(lora)  # before any loading or writing
    model = checkpoint.load_model(src, dtype=dtype)
    if lora is not None:
        peft_io.merge_adapter(model, lora, src)
    state = model.state_dict()
    if to == "meta":
        checkpoint.save_meta(state, model.params, dst, num_shards=shards)
    elif to == "hf":
        if shards != 1:
            raise checkpoint.CheckpointError("--shards applies to --to meta; HF files are split by size")
        checkpoint.save_hf(state, model.params, dst)
    else:
        raise checkpoint.CheckpointError(f"--to {to!r}: choose meta or hf")
    tok = checkpoint.default_tokenizer_path(src)
    names = [n for n in TOKENIZER_FILES if src.is_dir() and (src / n).exists()]
    if tok is not None and tok.suffix != ".gguf" and tok.name not in names:
        shutil.copy2(tok, dst / tok.name)  # Meta's download keeps tokenizer.model one dir up
    for name in names:
        shutil.copy2(src / name, dst / name)
    return dst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="Meta checkpoint dir, HF dir or .gguf file")
    parser.add_argument("dst", help="output directory (created)")
    parser.add_argument("--to", required=True, choices=["meta", "hf"])
    parser.add_argument("--shards", type=int, default=1, help="number of consolidated.NN.pth files (--to meta)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: keep the source's")
    parser.add_argument("--lora", metavar="ADAPTER", help="merge this LoRA adapter (PEFT dir or LoRA checkpoint)")
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.dst, args.to, args.shards, DTYPES.get(args.dtype), args.lora)
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.to} checkpoint to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
