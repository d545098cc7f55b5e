"""Strided-window perplexity, the protocol of HF's perplexity guide.

Windows of `max_length` tokens start every `stride` tokens; each window scores only the tokens
that no earlier window scored (earlier targets are masked), so every token is scored once, with as
much left context as the window allows: max_length - stride tokens at least. The first token of a
window is never a target (nothing precedes it inside the window), so with stride == max_length
(disjoint windows) one token per window goes unscored, exactly as in HF's loop.

The text is tokenized by the tokenizer's own rule, as the guide's `tokenizer(text)` does: BOS first
only where the tokenizer adds one (llama.tokenizer.encode_text). Without a BOS (SmolLM2), the
text's first token has no context and is not scored. Reported: nats per token, perplexity = exp(nats/token), bits per byte = total nats / ln 2 /
UTF-8 bytes of the text (comparable across tokenizers), tokens scored, tokens/s.
"""

import math
import time
from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

from llama.eval import EvalError
from llama.eval.scoring import encode_pair, score_requests
from llama.tokenizer import encode_text


@dataclass
class PerplexityResult:
    nll: float  # total negative log-likelihood, nats
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes of the text
    seconds: float
    max_length: int
    stride: int

    @property
    def nats_per_token(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_token)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def as_dict(self) -> dict:
        return {**asdict(self), "nats_per_token": self.nats_per_token, "perplexity": self.perplexity,
                "bits_per_byte": self.bits_per_byte, "tokens_per_s": self.tokens_per_s}


def check_window(max_length: int, stride: int, max_seq_len: int) -> None:
    if max_length < 2:
        raise EvalError(f"--max-length {max_length}: a window needs at least 2 tokens")
    if max_length > max_seq_len:
        raise EvalError(f"--max-length {max_length} exceeds the model's max_seq_len={max_seq_len}: "
                        f"lower --max-length or raise --max-seq-len")
    if not 1 <= stride <= max_length:
        raise EvalError(f"--stride {stride}: must be between 1 and --max-length ({max_length})")


def strided_windows(n_tokens: int, max_length: int, stride: int) -> List[Tuple[int, int, int]]:
    """(begin, end, n_targets) per window over n_tokens: HF's loop, targets being the last
    end - prev_end positions of the window, less its first position (it has no context)."""
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        n_targets = min(end - prev_end, end - begin - 1)
        if n_targets > 0:
            windows.append((begin, end, n_targets))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def perplexity_of_tokens(model, ids: List[int], n_bytes: int, max_length: int, stride: int,
                         batch_size: int = 8, progress: Optional[str] = None) -> PerplexityResult:
    """Perplexity of a token sequence `ids` under `model`: its first token is context only."""
    check_window(max_length, stride, model.params.max_seq_len)
    if len(ids) < 2:
        raise EvalError("the text has no tokens to score: give a longer text")
    windows = strided_windows(len(ids), max_length, stride)
    start = time.perf_counter()
    scores = score_requests(model, [(ids[b:e], n) for b, e, n in windows], batch_size, progress)
    seconds = time.perf_counter() - start
    nll = -sum(float(lp.double().sum()) for lp, _ in scores)
    return PerplexityResult(nll, sum(n for _, _, n in windows), n_bytes, seconds, max_length, stride)


def perplexity(model, tokenizer, text: str, max_length: int, stride: int, batch_size: int = 8,
               progress: Optional[str] = None) -> PerplexityResult:
    """Perplexity of `text`, tokenized whole by the tokenizer's own rule (encode_text)."""
    if not text.strip():
        raise EvalError("the text is empty: give a data file with some text in it")
    ids = encode_text(tokenizer, text)
    return perplexity_of_tokens(model, ids, len(text.encode("utf-8")), max_length, stride, batch_size, progress)


def conditional_perplexity(model, tokenizer, pairs: List[Tuple[str, str]], batch_size: int = 8,
                           progress: Optional[str] = None) -> PerplexityResult:
    """Perplexity of each completion given its prompt (HumanEval: canonical solutions), the
    prompts themselves unscored, each pair tokenized as lm-eval tokenizes a (context, continuation)
    (encode_pair). Each pair must fit the model's context; longer ones keep their end."""
    limit = model.params.max_seq_len + 1
    requests, n_bytes = [], 0
    for prompt, completion in pairs:
        ctx, cont = encode_pair(tokenizer, prompt, completion)
        if not cont:
            continue  # an empty completion: nothing to score
        requests.append(((ctx + cont)[-limit:], min(len(cont), limit - 1)))
        n_bytes += len(completion.encode("utf-8"))
    start = time.perf_counter()
    scores = score_requests(model, requests, batch_size, progress)
    seconds = time.perf_counter() - start
    nll = -sum(float(lp.double().sum()) for lp, _ in scores)
    return PerplexityResult(nll, sum(n for _, n in requests), n_bytes, seconds, limit - 1, limit - 1)
