import sys

from llama.eval.cli import main

sys.exit(main())
