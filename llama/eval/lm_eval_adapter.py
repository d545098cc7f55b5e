"""EleutherAI's lm-evaluation-harness on top of this project's Llama: the model `llama-ref`.

    pip install 'llama-ref[eval]'
    python -m llama.eval harness --model llama-ref --model_args ckpt_dir=out/,max_seq_len=2048 \\
        --tasks hellaswag --include_path my_tasks/

`python -m llama.eval harness` imports this module (which registers the model) and hands the rest of
the command line to lm_eval's own CLI. The class subclasses TemplateLM (HFLM would want a hub
download) and follows lm-eval's `hf` model request by request, so the same weights give the same
numbers under `--model hf` and `--model llama-ref`:
- tokens: `tok_encode` puts BOS first only where the tokenizer adds one (llama.tokenizer.encode_text,
  HF's `tokenizer(text)`); an empty context is the prefix token (BOS, else EOS); lm-eval's own
  TemplateLM makes the (context, continuation) pairs, which we score with the batched scorer of
  `python -m llama.eval choice`;
- loglikelihood_rolling: lm-eval's rolling windows over `tok_encode(text)` (disjoint, the first one
  conditioned on the prefix token), summed into plain floats;
- generate_until: greedy; the context keeps its last max_length - max_gen_toks tokens; the text is
  cut at the first stop sequence, the EOS text among them (lm-eval's own helpers).
"""

import os
import sys
from pathlib import Path
from typing import List, Optional

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from llama.common.errors import USER_ERRORS, report
from llama.common.files import check_not_input
from llama.eval import EvalError
from llama.eval.choice import loglikelihood_requests
from llama.common.dtypes import CHOICES, DTYPES, parse_dtype
from llama.eval.scoring import prefix_token, score_requests
from llama.tokenizer import encode_text

MODEL_ARGS = ("ckpt_dir", "lora", "tokenizer_path", "max_seq_len", "dtype", "device", "batch_size", "max_gen_toks")


@register_model("llama-ref")
class LlamaRefLM(TemplateLM):
    def __init__(self, ckpt_dir: Optional[str] = None, lora: Optional[str] = None, tokenizer_path: Optional[str] = None,
                 max_seq_len: int = 2048,
                 dtype: Optional[str] = None, device: Optional[str] = None, batch_size=8, max_gen_toks: int = 256,
                 llama=None, max_batch_size=None, **unknown):
        """lm-eval passes --model_args as keywords (plus batch_size, max_batch_size, device); `llama`
        is an already built Llama, for use from Python."""
        super().__init__()
        if unknown:
            raise unknown_model_args(unknown)
        if dtype is not None and dtype not in DTYPES:
            raise EvalError(f"dtype={dtype}: choose {CHOICES}")
        if llama is None:
            from llama.common import assets
            from llama.generation import Llama

            llama = Llama.build(ckpt_dir or str(assets.smollm2_gguf()), tokenizer_path, max_seq_len=int(max_seq_len),
                                max_batch_size=1, dtype=parse_dtype(dtype), device=device, lora=lora)
        self.llama, self.tokenizer = llama, llama.tokenizer
        # lm-eval's "auto" / "auto:N" (find the largest batch that fits) is not implemented: 8
        self.batch_size = 8 if batch_size is None or str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return prefix_token(self.tokenizer)

    @property
    def max_length(self) -> int:
        return self.llama.model.params.max_seq_len

    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None, **kwargs) -> List[int]:
        """HFLM's tok_encode: the tokenizer's own BOS rule, none with add_special_tokens=False."""
        if add_special_tokens is False:
            ids = self.tokenizer.encode(string, bos=False, eos=False)
        else:
            ids = encode_text(self.tokenizer, string)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(list(tokens))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        # TemplateLM made the pairs (scoring.encode_pair's rule); a context of spaces only has no
        # token left: the prefix token conditions it, as encode_pair does.
        pairs = [(ctx or [self.prefix_token_id], cont) for _, ctx, cont in requests]
        scores = score_requests(self.llama.model, loglikelihood_requests(pairs, self.max_length), self.batch_size)
        return [(float(lp.double().sum()), greedy) for lp, greedy in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        windows, owners = [], []
        for i, req in enumerate(requests):
            ids = self.tok_encode(req.args[0])
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    ids, self.prefix_token_id, self.max_length, context_len=1)):
                windows.append((ctx + cont, len(cont)))
                owners.append(i)
        totals = [0.0] * len(requests)
        for (lp, _), i in zip(score_requests(self.llama.model, windows, self.batch_size), owners):
            totals[i] += float(lp.double().sum())
        return totals  # plain floats: lm-eval sums them into word/byte perplexities

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        eos = self.tokenizer.decode([self.eot_token_id])
        out = []
        for req in requests:  # one at a time: the model's max_batch_size may be 1
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            if kwargs.get("do_sample"):
                raise EvalError("llama-ref generates greedily only: set do_sample: false, temperature: 0 in the task")
            until, max_gen = handle_stop_sequences(kwargs.get("until"), eos=eos), kwargs["max_gen_toks"]
            if not 0 < max_gen < self.max_length:
                raise EvalError(f"max_gen_toks {max_gen} must be between 1 and max_seq_len - 1 ({self.max_length - 1})")
            tokens = [self.tok_encode(context, left_truncate_len=self.max_length - max_gen)]
            tokens, _ = self.llama.generate(tokens, max_gen, temperature=0.0)
            out.append(postprocess_generated_text(self.tok_decode(tokens[0]), until, None))
        return out


def _flag_values(argv: List[str], *flags: str) -> List[str]:
    """The values given to `flags` (as `--flag v`, `--flag=v`, or several words after `--flag`)."""
    values, i = [], 0
    while i < len(argv):
        flag, _, inline = argv[i].partition("=")
        if flag in flags:
            if inline:
                values.append(inline)
            else:
                while i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                    values.append(argv[i + 1])
                    i += 1
        i += 1
    return values


def _model_args(argv: List[str]) -> dict:
    """--model_args in the `k=v,k=v` form (other forms, JSON, reach the constructor's checks)."""
    return {k.strip(): v for text in _flag_values(argv, "--model_args", "-a") if not text.lstrip().startswith("{")
            for k, _, v in (part.partition("=") for part in text.split(",")) if _}


def check_model_args(argv: List[str]) -> None:
    """Refuse an unknown llama-ref model arg before lm-eval indexes its ~15,000 task configs (seconds
    to minutes); LlamaRefLM's constructor checks the same when the model is built."""
    if _flag_values(argv, "--model")[:1] != ["llama-ref"]:
        return
    unknown = set(_model_args(argv)) - set(MODEL_ARGS) - {"max_batch_size"}
    if unknown:
        raise unknown_model_args(unknown)


def check_output_path(argv: List[str]) -> None:
    """lm-eval's --output_path follows the project's output rule: never an input (the checkpoint, the
    adapter, the tokenizer, a task folder), a folder holding one or inside one. lm-eval itself never
    replaces a file there (its names carry the date)."""
    outputs = _flag_values(argv, "--output_path", "-o")
    if not outputs:
        return
    out, args = Path(outputs[0]), _model_args(argv)
    inputs = [args.get(k) for k in ("ckpt_dir", "lora", "tokenizer_path")] + _flag_values(argv, "--include_path")
    check_not_input(out, inputs, "--output_path")
    if out.exists() and not out.is_dir() and out.suffix != ".json":
        raise EvalError(f"--output_path {out} is a file: lm-eval writes a folder there (or NAME_DATE.json beside "
                        f"a .json name): choose another path")


def unknown_model_args(names) -> EvalError:
    return EvalError(f"unknown llama-ref model arg(s) {', '.join(sorted(names))}: use {', '.join(MODEL_ARGS)}")


def _from_lm_eval_config(e: BaseException) -> bool:
    """Was `e` raised by lm-eval's checks of its command line (unknown task, --log_samples without
    --output_path, ...)? Those ValueErrors are the user's; any other ValueError is a bug."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.endswith(os.path.join("lm_eval", "config",
                                                                                    "evaluate_config.py"))


def harness_main(argv: List[str]) -> int:
    """lm_eval's command line with llama-ref registered; a user error prints one line, exit 1."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    try:
        check_model_args(argv)
        check_output_path(argv)
        cli_evaluate()
    except USER_ERRORS as e:
        return report(e)
    except ValueError as e:
        if not _from_lm_eval_config(e):
            raise  # a bug, ours or lm-eval's: its traceback
        return report(EvalError(f"lm_eval: {e}"))
    return 0
