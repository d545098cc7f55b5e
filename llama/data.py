"""`python -m llama.data`: the command line of llama.train.data (kept at this name)."""

import sys

from llama.train.data import main

if __name__ == "__main__":
    sys.exit(main())
