"""Train or fine-tune a Llama: one process, or torchrun with model parallel x data parallel.

    python train.py                                        # configs/train/default.toml: a small model
                                                           # on this Python's stdlib source, CPU, minutes
    python train.py configs/train/default.toml max_steps=50 out_dir=out/try
    python train.py configs/train/sft.toml                 # chat fine-tuning (assistant tokens only)
    torchrun --nproc_per_node 8 train.py configs/train/llama3.2-1b.toml model_parallel_size=2
    python train.py out_dir=out/try resume=true            # continue exactly where it stopped

Then: python generate.py --ckpt-dir out/default/step_000200
"""

import sys

from llama.threads import POLICY_HELP, set_torch_threads, set_wait_policy

set_wait_policy()  # before torch loads OpenMP, which reads it once (llama/threads.py)

from llama.errors import USER_ERRORS, report  # noqa: E402
from llama.train.config import load_config  # noqa: E402


def parse_args(argv):
    """[CONFIG.toml] [key=value ...] -> (config path or None, overrides)."""
    if any(a in ("-h", "--help") for a in argv):
        from llama.train.config import config_help

        print(__doc__)
        print(POLICY_HELP + "\n")
        print("Config keys (key=value on the command line, or in a TOML file), with their defaults:")
        print(config_help())
        sys.exit(0)
    path = None
    if argv and "=" not in argv[0]:
        path, argv = argv[0], argv[1:]
    return path, argv


def main(argv=None) -> int:
    path, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(path, overrides)
        set_torch_threads()
        from llama.train.setup import train  # after the config checks: importing torch takes a while

        result = train(cfg)
    except KeyboardInterrupt:
        print("interrupted: the last complete checkpoint is kept (resume=true continues from it)", file=sys.stderr)
        return 130
    except USER_ERRORS as e:  # bad config, data, paths or a diverged run: one line; anything else is a bug
        return report(e)
    if result["checkpoint"]:
        print(f"done: {result['checkpoint']}  (sample: python generate.py --ckpt-dir {result['checkpoint']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
