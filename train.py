"""Train or fine-tune a Llama: one process, or torchrun with model parallel x data parallel.

    python train.py                                        # configs/train/default.toml: a small model
                                                           # on this Python's stdlib source, CPU, minutes
    python train.py configs/train/default.toml max_steps=50 out_dir=out/try
    python train.py configs/train/sft.toml                 # chat fine-tuning (assistant tokens only)
    torchrun --nproc_per_node 8 train.py configs/train/llama3.2-1b.toml model_parallel_size=2
    python train.py out_dir=out/try resume=true            # continue exactly where it stopped

Then: python generate.py --ckpt-dir out/default/step_000200   (its last lines say what fits the run: --chat,
--lora, compare with the base)
"""

import sys

from llama.common.threads import POLICY_HELP, set_torch_threads, set_wait_policy

if __name__ == "__main__":
    set_wait_policy()  # before torch loads OpenMP, which reads it once (llama/common/threads.py)

from llama.common.errors import USER_ERRORS, report  # noqa: E402
from llama.train import adapters, dpo
from llama.train.config import TrainConfig, config_help, load_config
from llama.train.loop import Run, loop, make_optimizer, save
from llama.train.metrics import MetricsLog, peak_tflops
from llama.train.setup import (autocast_for, build_model, check_run, claim_run_folder, describe, distribute,
                               is_first_rank, load_data, next_commands, resume, start_processes)
from llama.train.state import release_out_dir


def setup(cfg: TrainConfig) -> Run:
    """Everything up to the first step. Collective: every process of a torchrun job calls it."""
    # Config: every check that needs no work runs first (keys, paths, the layout against the world
    # size and the model's shape), so a bad run fails in a second, not after tokenizing a corpus.
    cfg, args = check_run(cfg)
    # Processes: torch.distributed + Fairscale's model-parallel x data-parallel groups (none in a
    # plain `python` process), this rank's device, the seed.
    device = start_processes(cfg)
    # Data: rank 0 tokenizes once into data_cache (the others wait), then memory-mapped batches,
    # the same global batch at every layout; each data-parallel rank reads its rows.
    data = load_data(cfg, args)
    # Model: this rank's model-parallel shard in fp32, from init_from or freshly initialised
    # (under FSDP it stays on the CPU until it is sharded).
    model = build_model(cfg, args, device)
    if cfg.lora_rank:  # LoRA: small trainable adapters beside a frozen (optionally bf16) base
        adapters.attach(cfg, model, device)
    # Preference pairs (objective=dpo): DPO/IPO/SimPO against a frozen reference, the starting model
    # (LoRA: the same weights with the adapters off; else a copy taken now, before sharding).
    objective = dpo.objective(cfg, model, device) if cfg.objective == "dpo" else None
    # Data parallel: FSDP shards it over the data-parallel group, or DDP keeps a replica per rank;
    # plus activation checkpointing and torch.compile when the config asks.
    net = distribute(cfg, model, device)
    # Optimizer: AdamW over what trains, weight decay on the matrices only.
    optimizer = make_optimizer(net.model, cfg, device)
    # Resume (resume=true): weights, optimizer, RNG and data position from out_dir's latest checkpoint.
    progress = resume(cfg, net.model, optimizer, device)
    # The run folder: rank 0 locks out_dir, so a second run into it refuses (overwrite=true: the earlier
    # run's checkpoints go now); released when the run ends.
    claim_run_folder(cfg)
    # The run: everything the loop reads, in typed pieces (llama/train/loop.py).
    return Run(cfg=cfg, device=device, autocast=autocast_for(cfg, device), data=data, net=net, optimizer=optimizer,
               progress=progress, log=MetricsLog(cfg.out_dir, is_first_rank(), cfg.max_steps, progress.step),
               peak_tflops=peak_tflops(device, cfg.peak_tflops), objective=objective)


def train(cfg: TrainConfig) -> dict:
    """Run (or continue) the training cfg describes; returns the loss curves and the last checkpoint.
    Collective: every process of a torchrun job calls it."""
    run = setup(cfg)
    run.log.print(describe(run))  # rank 0: parameters, layout, device, data
    try:
        # The loop: steps until max_steps, logging, evaluating and saving every save_every steps.
        curves = loop(run)
        # The final checkpoint: Meta's layout (generate.py reads it) + what an exact resume needs.
        checkpoint = save(run)
    finally:
        run.log.close()
        release_out_dir(cfg.out_dir)
    return {**curves, "checkpoint": str(checkpoint)}


def parse_args(argv):
    """[CONFIG.toml] [key=value ...] -> (config path or None, overrides)."""
    if any(a in ("-h", "--help") for a in argv):
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
        result = train(cfg)
    except KeyboardInterrupt:
        print("interrupted: the last complete checkpoint is kept (resume=true continues from it)", file=sys.stderr)
        return 130
    except USER_ERRORS as e:  # bad config, data, paths or a diverged run: one line; anything else is a bug
        return report(e)
    print(f"done: {result['checkpoint']}\n{next_commands(cfg, result['checkpoint'])}")  # chat / sample, compare
    return 0


if __name__ == "__main__":
    sys.exit(main())
