"""The one scorer every evaluation uses: log-probabilities of the target tokens of many sequences.

A request is `(tokens, n_targets)`: score the last `n_targets` tokens of `tokens`, each given all the
tokens before it. A perplexity window, a multiple-choice continuation and an lm-eval request are all
this shape, so they share one batched code path and agree with each other exactly.

The tokens come from the tokenizer's own rules, as lm-eval's `hf` model makes them: `encode_text`
(llama/tokenizer) puts BOS first only where the tokenizer adds one; `prefix_token` conditions a text
that has no context; `encode_pair` is lm-eval's (context, continuation) tokenization.

Speed comes from two general things: sequences of similar length are batched (right padding is
harmless under a causal mask: no real position attends to a pad that follows it), and the output
projection plus log-softmax, ~20% of a small model's FLOPs and the largest tensors, run only on
the positions that are scored rather than on every position of every window.
"""

import sys
from functools import partial
from typing import List, Optional, Sequence, Tuple

import torch

from llama import parallel
from llama.parallel.loss import vocab_parallel_argmax, vocab_parallel_cross_entropy
from llama.tokenizer import encode_text

Request = Tuple[Sequence[int], int]

HEAD_ROWS = 1024  # positions per output-projection chunk: (1024, vocab) fp32 logits at a time


def prefix_token(tokenizer) -> int:
    """lm-eval's prefix_token_id: the token that conditions a text with no context (an empty
    context, the first rolling window): BOS, else EOS (GPT-2-style vocabularies)."""
    bos = getattr(tokenizer, "bos_id", None)
    return bos if bos is not None else tokenizer.eos_id


def encode_pair(tokenizer, context: str, continuation: str) -> Tuple[List[int], List[int]]:
    """(context ids, continuation ids) as lm-eval's TemplateLM.loglikelihood makes them: trailing
    spaces of the context move to the continuation; the context is encoded by the tokenizer's own
    rule (encode_text) and the continuation is what encoding the whole adds to it. An empty context
    is the prefix token (or the continuation's first token, when that is the prefix token). A
    context of spaces only, which lm-eval would leave with no token at all, is the prefix token too."""
    if context == "":
        cont = tokenizer.encode(continuation, bos=False, eos=False)
        prefix = prefix_token(tokenizer)
        return (cont[:1], cont[1:]) if cont and cont[0] == prefix else ([prefix], cont)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    ctx = encode_text(tokenizer, context)
    whole = encode_text(tokenizer, context + continuation)
    return (ctx or [prefix_token(tokenizer)]), whole[len(ctx):]


def _score_batch(model, batch: List[Request]) -> List[Tuple[torch.Tensor, bool]]:
    """(target log-probs (n,), all targets greedy) for each request of one padded batch."""
    device = model.tok_embeddings.weight.device
    T = max(len(toks) for toks, _ in batch) - 1
    inputs = torch.zeros(len(batch), T, dtype=torch.long)  # (B, T), right-padded with id 0
    rows, cols, targets = [], [], []
    for b, (toks, n) in enumerate(batch):
        inputs[b, : len(toks) - 1] = torch.as_tensor(toks[:-1])
        # position p predicts token p + 1: the last n predictions are the targets
        rows += [b] * n
        cols += range(len(toks) - 1 - n, len(toks) - 1)
        targets += toks[len(toks) - n:]
    head = partial(_target_scores, rows=torch.tensor(rows), cols=torch.tensor(cols),
                   targets=torch.tensor(targets, device=device))
    logprobs, greedy = model(inputs.to(device), head=head)  # the head runs inside the model's forward (FSDP)
    logprobs, greedy = logprobs.cpu(), greedy.cpu()
    out, i = [], 0
    for _, n in batch:
        out.append((logprobs[i : i + n], bool(greedy[i : i + n].all())))
        i += n
    return out


def _target_scores(model, h: torch.Tensor, rows, cols, targets) -> Tuple[torch.Tensor, torch.Tensor]:
    """The model's head on the scored positions only, HEAD_ROWS at a time: (log-prob of each target (N,),
    is it the argmax (N,)). Under model parallelism from each rank's vocabulary slice, never gathered."""
    h = h[rows, cols]  # (N, D)
    logprobs, greedy = [], []
    for start in range(0, len(targets), HEAD_ROWS):
        logits = model.logits(h[start : start + HEAD_ROWS])  # (n, V/M) float32
        tgt = targets[start : start + HEAD_ROWS]
        logprobs.append(-vocab_parallel_cross_entropy(logits, tgt))
        greedy.append(vocab_parallel_argmax(logits) == tgt)
    return torch.cat(logprobs), torch.cat(greedy)


@torch.inference_mode()
def score_requests(model, requests: List[Request], batch_size: int = 8,
                   progress: Optional[str] = None) -> List[Tuple[torch.Tensor, bool]]:
    """For each (tokens, n_targets): the targets' log-probabilities (n_targets,) and whether every
    target was the argmax. Longest first, so a batch holds similar lengths; results in input order.
    `progress`: a label for a progress bar (progress_bar), counted in target tokens."""
    for toks, n in requests:
        if not 1 <= n < len(toks):
            raise ValueError(f"a request of {len(toks)} tokens cannot score {n} targets")
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
    results = [None] * len(requests)
    with progress_bar(progress, sum(n for _, n in requests), "tok") as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            for i, res in zip(chunk, _score_batch(model, [requests[i] for i in chunk])):
                results[i] = res
            bar.update(sum(requests[i][1] for i in chunk))
    return results


def progress_bar(label: Optional[str], total: int, unit: str):
    """A tqdm bar on stderr, as training's: only with a label, on a terminal, on rank 0 (under torchrun
    every rank runs the same evaluation)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit=unit, unit_scale=True, dynamic_ncols=True, leave=False, file=sys.stderr,
                disable=label is None or not parallel.is_first_rank() or not sys.stderr.isatty())


def greedy_completions(llama, prompts: List[str], max_gen_len: int, until: Sequence[str] = (),
                       truncate: bool = False, chat: bool = False, progress: Optional[str] = None) -> List[str]:
    """Greedy (temperature 0) continuation of each prompt, cut before the first `until` string;
    with truncate, a prompt too long for the context keeps its end; with chat, each prompt is a user
    message in the model's chat format and the text is the reply."""
    texts = []
    with progress_bar(progress, len(prompts), "prompt") as bar:
        for prompt in prompts:  # one at a time: the model's max_batch_size may be 1
            tokens = [llama.encode_dialog([{"role": "user", "content": prompt}]) if chat else llama.encode_prompt(prompt)]
            tokens, _ = llama.generate(llama.truncate_prompts(tokens, max_gen_len) if truncate else tokens, max_gen_len,
                                       temperature=0.0)
            text = llama.tokenizer.decode(tokens[0])
            cuts = [text.index(s) for s in until if s and s in text]
            texts.append(text[: min(cuts)] if cuts else text)
            bar.update(1)
    return texts
