"""Sample from a Llama checkpoint: `python generate.py --help`. The work is in llama/generation/cli.py."""

import sys

from llama.common.threads import set_wait_policy

set_wait_policy()  # before torch loads OpenMP, which reads it once (llama/common/threads.py)

from llama.generation.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
