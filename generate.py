"""Sample from a Llama checkpoint: `python generate.py --help`. The work is in llama/generate_cli.py."""

import sys

from llama.generate_cli import main

if __name__ == "__main__":
    sys.exit(main())
