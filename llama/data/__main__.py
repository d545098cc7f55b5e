"""`python -m llama.data`: the command line of llama.data.prepare (kept at this name)."""

import sys

from llama.data.prepare import main

if __name__ == "__main__":
    sys.exit(main())
