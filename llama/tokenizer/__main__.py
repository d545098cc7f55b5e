"""python -m llama.tokenizer train|encode: train a BPE tokenizer on your text, or look at ids."""

import argparse
import json
import sys
from pathlib import Path

from llama.errors import USER_ERRORS, report
from llama.tokenizer import load_tokenizer
from llama.tokenizer.errors import TokenizerError
from llama.tokenizer.train import train_bpe


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama.tokenizer", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a BPE tokenizer.model (tiktoken format) on your text")
    train.add_argument("--input", nargs="+", required=True, metavar="FILES", help="files or directories")
    train.add_argument("--vocab-size", type=int, required=True, help="total, including 256 special tokens")
    train.add_argument("--out", required=True, metavar="PATH")
    encode = sub.add_parser("encode", help="print the ids and pieces of some text")
    encode.add_argument("--tokenizer", required=True, metavar="PATH")
    encode.add_argument("text")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":

            for item in args.input:
                if not Path(item).exists():
                    raise TokenizerError(f"{item}: no such training file or directory")
            out = train_bpe([Path(p) for p in args.input], args.vocab_size, args.out, verbose=True)
            print(f"wrote {out}: {load_tokenizer(out).n_words} tokens including 256 special tokens")
        else:
            tok = load_tokenizer(args.tokenizer)
            try:
                ids = tok.encode(args.text, bos=tok.add_bos, eos=False)
            except ValueError as e:  # e.g. special-token text a byte-level BPE refuses
                raise TokenizerError(f"{args.tokenizer}: cannot encode this text: {e}") from None
            print(json.dumps({"ids": ids, "pieces": [tok.decode([i]) for i in ids]}, ensure_ascii=False))
    except USER_ERRORS as e:  # TokenizerError or a missing path: one line; anything else is a bug
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
