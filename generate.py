"""Sample from a Llama checkpoint: `python generate.py --help`. The work is in llama/generate_cli.py."""

import sys

from llama.threads import set_wait_policy

set_wait_policy()  # before torch loads OpenMP, which reads it once (llama/threads.py)

from llama.generate_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
