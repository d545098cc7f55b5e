"""python -m llama.tokenizer train|encode: train a BPE tokenizer on your text, or look at ids."""

import sys

from llama.tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
