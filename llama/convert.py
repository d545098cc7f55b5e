"""`python -m llama.convert`: the command line of llama.checkpoint.convert (kept at this name)."""

import sys

from llama.checkpoint.convert import main

if __name__ == "__main__":
    sys.exit(main())
