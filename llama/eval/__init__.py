"""Evaluation: measure a checkpoint on your own data and on standard tasks.

    python -m llama.eval perplexity [--ckpt-dir ...] [--data FILE|NAME]   strided-window perplexity
    python -m llama.eval choice --data items.jsonl                        multiple choice by loglikelihood
    python -m llama.eval compare A B [C ...]                              side by side, Markdown + PNG
    python -m llama.eval harness --model llama-ref --tasks ...            lm-evaluation-harness (the [eval] extra)

The pieces: scoring.py (log-probabilities of target tokens, batched; greedy completions),
perplexity.py, choice.py, data.py (offline data from PyPI wheels), lm_eval_adapter.py, compare.py, cli.py.
See docs/evaluation.md.
"""

from llama.common.errors import UserError


class EvalError(UserError):
    """Bad evaluation input: a missing or empty data file, a malformed jsonl line, a bad window."""
