"""Text generation with Meta's API: Llama.build, generate, text_completion, chat_completion.

How a request runs (prompt lengths n_b, batch B):
1. The KV cache is sized to the request, B x (longest prompt + max_gen_len), never to
   max_batch_size x max_seq_len: at 128K context that difference is the whole memory budget.
2. Prefill: each prompt runs through the model alone, into its own cache slot, in chunks of
   `prefill_chunk` tokens, so activation memory is bounded by the chunk and not the prompt. Only
   the last position's logits are computed (a 128K prompt x 128K vocabulary in fp32 would be
   67 GB) unless echo + logprobs asks for every prompt position.
3. Decode: all sequences advance together, one token per step, each at its own position (the
   model takes a tensor start_pos). A ragged batch therefore computes exactly what each sequence
   would compute alone: no padding ever enters attention. Each sequence stops on its own, at a
   stop token of the tokenizer or at max_gen_len.
"""

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from llama import parallel
from llama.model import KVCache
from llama.common.checks import check_device, check_dialogs, check_max_gen_len, check_prompts, check_seed, check_sizes
from llama.common.dtypes import parse_dtype
from llama.common.errors import ArgumentError
from llama.generation.bf16 import use_bf16_kernel
from llama.generation.compile import CompiledStep, mark_cache_dynamic
from llama.generation.quantize import check_quantize, quantize_model
from llama.generation.sampling import alternatives, check_sampling_args, sample
from llama.tokenizer import encode_text


def cache_slot(cache: List[KVCache], b: int) -> List[KVCache]:
    """Sequence b's slot of every layer's cache, sharing storage: prefill one ragged prompt at a time."""
    views = []
    for layer in cache:
        view = KVCache.__new__(KVCache)
        view.k, view.v = layer.k[b : b + 1], layer.v[b : b + 1]  # (1, K, S, Dh)
        views.append(view)
    return views


@dataclass
class Token:
    """One generated token of one sequence, as streamed by Llama.generate_tokens."""

    seq: int  # index of the sequence in the batch
    id: int
    logprob: Optional[float] = None  # log p(token | prefix) from the raw logits (logprobs=True)
    top: List[Tuple[int, float]] = field(default_factory=list)  # likeliest ids and their probabilities
    done: bool = False  # the sequence's last token: a stop token or its length limit


@dataclass
class Stats:
    """Timing of the last request: time to first token covers the prefill; tokens/s the decode."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    first_step_s: float = 0.0  # compiled: the first decode step, timed apart (it may compile)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")


class Llama:
    @staticmethod
    def build(ckpt_dir, tokenizer_path=None, max_seq_len: int = 2048, max_batch_size: int = 4,
              model_parallel_size: Optional[int] = None, seed: int = 1, device=None, dtype=None,
              compile: bool = False, quantize: Optional[str] = None, lora: Optional[str] = None,
              group_size: Optional[int] = None) -> "Llama":
        """Load a Meta dir, an HF dir or a .gguf file (and its tokenizer) onto `device`. Under torchrun
        the model is split over `model_parallel_size` ranks (default: all of them). `lora`: a LoRA
        adapter (PEFT dir or LoRA training checkpoint) merged into the weights at load; a LoRA
        checkpoint given as ckpt_dir loads its recorded base with it. `quantize` ("int8", "int4") with
        `group_size` (None: its default): weight-only quantization, see llama/generation/quantize.py."""
        from llama.checkpoint import CheckpointError, default_tokenizer_path, detect_format, load_model
        from llama.checkpoint.peft import find_adapter, merge_adapter, recorded_base
        from llama.tokenizer import check_vocab, load_tokenizer

        check_sizes(max_seq_len, max_batch_size)  # bad arguments fail here, before any file is read
        check_seed("seed", seed)
        check_device(device, "device")
        check_quantize(quantize, group_size)
        dtype = parse_dtype(dtype)
        if lora is None and recorded_base(ckpt_dir) is not None:  # out/lora: adapters + a pointer to the base
            lora, ckpt_dir = ckpt_dir, recorded_base(ckpt_dir)
        if lora is not None:
            find_adapter(lora)  # fails before any loading
        detect_format(ckpt_dir)  # a missing path fails here, before any process group is set up
        parallel.init_distributed(model_parallel_size)
        torch.manual_seed(seed)  # the same seed on every rank: see _sample
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        tokenizer_path = tokenizer_path or default_tokenizer_path(ckpt_dir)
        if tokenizer_path is None:
            raise CheckpointError(f"{ckpt_dir}: no tokenizer found beside the weights: pass tokenizer_path "
                                  "(generate.py --tokenizer-path)")
        tokenizer = load_tokenizer(tokenizer_path)
        start = time.perf_counter()
        # Quantized weights are loaded straight from the file (the float model never exists), except
        # when a LoRA adapter is merged into the float weights first.
        at_load = quantize if lora is None else None
        model = load_model(ckpt_dir, max_seq_len, max_batch_size, device, dtype, quantize=at_load, group_size=group_size)
        if lora is not None:
            merge_adapter(model, lora, ckpt_dir)
        check_vocab(tokenizer, model.params.vocab_size)
        if quantize is not None and at_load is None:
            quantize_model(model, quantize, group_size)
        elif quantize is None:
            use_bf16_kernel(model)  # a bf16 model on the CPU: decode products through the bf16 kernel
        llama = Llama(model, tokenizer, seed=seed, compile=compile)
        llama.load_s = time.perf_counter() - start
        return llama

    def __init__(self, model, tokenizer, seed: int = 1, compile: bool = False, prefill_chunk: int = 512):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.device = model.tok_embeddings.weight.device
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.stats = Stats()
        self.load_s = 0.0
        # Decoding with per-sequence positions has fixed shapes (B, 1) and a full-length cache, so
        # torch.compile traces it once per batch size (the cache length is marked dynamic).
        # CompiledStep compiles it again if the model's weights change.
        self.compiled = compile
        self._decode = CompiledStep(self, self.device) if compile else self._decode_step

    @property
    def stop_tokens(self) -> frozenset:
        """The ids that end a sequence: the tokenizer's stop tokens (none if it declares none)."""
        return frozenset(getattr(self.tokenizer, "stop_tokens", ()))

    # ------------------------------------------------------------------ the engine

    def _decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        # On a CPU, attention for one query per sequence takes SDPA's plain form (QK^T, softmax, xV):
        # compiled, inductor fuses it into the step, where the flash kernel's fixed cost per call outweighs
        # its gain for one query; eager too, where the flash kernel's threads waited for a busy core
        # (docs/performance.md, "Decode attention").
        math_attention = self.device.type == "cpu"
        with sdpa_kernel([SDPBackend.MATH]) if math_attention else contextlib.nullcontext():
            return self.model(tokens, positions, cache)[:, -1]  # (B, V)

    @torch.inference_mode()
    def _prefill(self, tokens: List[int], cache_slot, prompt_logprobs: Optional[list]) -> torch.Tensor:
        """Run one prompt through the model in chunks; return the last position's logits (V,).
        With prompt_logprobs (a list), append log p(token_t | tokens before t) for t = 1 .. n-1."""
        x = torch.tensor([tokens], dtype=torch.long, device=self.device)  # (1, n)
        n = x.shape[1]
        for start in range(0, n, self.prefill_chunk):
            chunk = x[:, start : start + self.prefill_chunk]  # (1, C)
            logits = self.model(chunk, start, cache_slot, last_only=prompt_logprobs is None)
            if prompt_logprobs is not None:  # chunk position t predicts token t + 1
                targets = x[0, start + 1 : start + chunk.shape[1] + 1]  # (C,) or (C-1,) at the end
                logp = torch.log_softmax(logits[0, : targets.shape[0]], dim=-1)
                prompt_logprobs.extend(logp.gather(-1, targets[:, None])[:, 0].tolist())
        return logits[0, -1]

    def _sample(self, logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
        next_ids = sample(logits, temperature, top_p, top_k, self.generator)  # (B,)
        if parallel.model_parallel_size() > 1:
            # Every rank sampled with the same seed from the same gathered logits; rank 0's choice is
            # still sent to all so that a last-bit difference in the logits can never split them.
            group = parallel.model_parallel_group()
            torch.distributed.broadcast(next_ids, torch.distributed.get_global_rank(group, 0), group=group)
        return next_ids

    def check_request(self, prompt_tokens: List[List[int]], max_gen_len: int) -> None:
        """Refuse a request that cannot run, saying how to fix it (ArgumentError, a ValueError)."""
        params = self.model.params
        if not prompt_tokens:
            raise ArgumentError("no prompts given: pass at least one prompt")
        if len(prompt_tokens) > params.max_batch_size:
            raise ArgumentError(f"{len(prompt_tokens)} prompts exceed max_batch_size={params.max_batch_size}: "
                                "raise max_batch_size (--max-batch-size) or pass fewer prompts")
        if max_gen_len < 1:
            raise ArgumentError(f"max_gen_len={max_gen_len}: generate at least 1 token")
        for i, prompt in enumerate(prompt_tokens):
            if len(prompt) == 0:
                raise ArgumentError(f"prompt {i} is empty: give it at least one token")
            if len(prompt) >= params.max_seq_len:
                raise ArgumentError(f"prompt {i} has {len(prompt)} tokens, leaving no room to generate within "
                                    f"max_seq_len={params.max_seq_len}: raise max_seq_len (--max-seq-len), "
                                    "shorten the prompt, or ask for truncation (--truncate)")
            if min(prompt) < 0 or max(prompt) >= params.vocab_size:
                raise ArgumentError(f"prompt {i} has token ids outside [0, {params.vocab_size}): "
                                    "encode it with the checkpoint's own tokenizer")

    def generate_tokens(self, prompt_tokens: List[List[int]], max_gen_len: int, *, temperature: float = 0.6,
                        top_p: float = 0.9, top_k: int = 0, logprobs: bool = False, top_n: int = 0,
                        prompt_logprobs: Optional[List[list]] = None) -> Iterator[Token]:
        """Yield each generated Token as soon as it is chosen, in step order (all live sequences
        at step 1, then step 2, ...). top_n > 0 attaches the n likeliest alternatives. A list of
        B lists passed as prompt_logprobs receives each prompt's token log-probabilities."""
        check_sampling_args(temperature, top_p, top_k)
        self.check_request(prompt_tokens, max_gen_len)
        steps = self._generate(prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, top_n,
                               prompt_logprobs)
        # Inference mode covers our own work only: entered for each step, left before the token goes
        # to the caller, whose loop body may build autograd graphs (`with` around `yield from`
        # would keep the mode on in the caller's loop, and for as long as the generator lives).
        while True:
            with torch.inference_mode():
                token = next(steps, None)
            if token is None:
                return
            yield token

    def _generate(self, prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, top_n, prompt_logprobs):
        B, lengths = len(prompt_tokens), [len(p) for p in prompt_tokens]
        max_seq_len = self.model.params.max_seq_len
        total_len = min(max_seq_len, max(lengths) + max_gen_len)
        budget = [min(max_gen_len, total_len - n) for n in lengths]  # new tokens each may have
        stop = self.stop_tokens
        self.stats = stats = Stats(prompt_tokens=sum(lengths))
        start = time.perf_counter()
        cache = self.model.make_cache(B, total_len)
        if self.compiled:
            self._decode.check()  # the weights are still those it compiled (else it compiles again)
            mark_cache_dynamic(cache)
        logits = torch.stack([  # (B, V)
            self._prefill(p, cache_slot(cache, b), None if prompt_logprobs is None else prompt_logprobs[b])
            for b, p in enumerate(prompt_tokens)])
        positions = torch.tensor(lengths, device=self.device)  # where each sequence's next token goes
        generated, done = [0] * B, [False] * B
        while True:
            next_ids = self._sample(logits, temperature, top_p, top_k)  # (B,)
            ids = next_ids.tolist()  # waits for the step to finish: timings below are honest
            if stats.generated_tokens == 0:
                stats.time_to_first_token_s = time.perf_counter() - start
                decode_start = time.perf_counter()
            chosen = torch.log_softmax(logits, -1).gather(-1, next_ids[:, None])[:, 0].tolist() if logprobs else None
            top = [list(zip(i.tolist(), p.tolist())) for p, i in zip(*alternatives(logits, temperature, top_n))] \
                if top_n > 0 else None
            for b in range(B):
                if done[b]:
                    continue
                generated[b] += 1
                stats.generated_tokens += 1
                done[b] = ids[b] in stop or generated[b] >= budget[b]
                yield Token(b, ids[b], chosen[b] if chosen else None, top[b] if top else [], done[b])
            if all(done):
                break
            # Finished sequences keep riding along (fixed shapes); their position is clamped so they
            # only ever overwrite their own last slot.
            logits = self._decode(next_ids.view(B, 1), positions, cache)
            positions = (positions + 1).clamp_max(total_len - 1)
            if self.compiled and not stats.first_step_s:  # keep minutes of compiling out of tokens/s
                if logits.is_cuda:
                    torch.cuda.synchronize()
                stats.first_step_s = time.perf_counter() - decode_start
                decode_start = time.perf_counter()
                continue
            stats.decode_steps += 1
        stats.decode_s = time.perf_counter() - decode_start if stats.decode_steps else 0.0

    # ------------------------------------------------------------------ Meta's API

    def generate(self, prompt_tokens: List[List[int]], max_gen_len: int, *, temperature: float = 0.6,
                 top_p: float = 0.9, top_k: int = 0, logprobs: bool = False, echo: bool = False,
                 ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Meta's generate: (tokens, logprobs) per sequence, new tokens only (prompt too with echo),
        cut before the first stop token. With echo, the first prompt token's logprob is 0, as in Meta's."""
        tokens, lps, _ = self._generate_until_stop(prompt_tokens, max_gen_len, temperature=temperature, top_p=top_p,
                                                   top_k=top_k, logprobs=logprobs, echo=echo)
        return tokens, lps

    def _generate_until_stop(self, prompt_tokens, max_gen_len, *, temperature, top_p, top_k, logprobs, echo):
        """generate()'s work, plus the stop token that ended each sequence (None: its length limit)."""
        B = len(prompt_tokens)
        prompt_lp = [[0.0] for _ in range(B)] if (logprobs and echo) else None
        out = [list(p) if echo else [] for p in prompt_tokens]
        out_lp = [[] for _ in range(B)]
        stop = self.stop_tokens
        ended: List[Optional[int]] = [None] * B  # the stop token each sequence ended with
        for tok in self.generate_tokens(prompt_tokens, max_gen_len, temperature=temperature, top_p=top_p,
                                        top_k=top_k, logprobs=logprobs, prompt_logprobs=prompt_lp):
            if ended[tok.seq] is not None:
                continue
            if tok.id in stop:
                ended[tok.seq] = tok.id
                continue
            out[tok.seq].append(tok.id)
            out_lp[tok.seq].append(tok.logprob)
        if not logprobs:
            return out, None, ended
        return out, [(prompt_lp[b] if echo else []) + out_lp[b] for b in range(B)], ended

    def encode_prompt(self, text: str) -> List[int]:
        """A prompt's tokens as generate() takes them: BOS first where the tokenizer's own rule adds one."""
        return encode_text(self.tokenizer, text)

    def truncate_prompts(self, prompts: List[List[int]], max_gen_len: int) -> List[List[int]]:
        """Keep the end of each over-long prompt (and its BOS), leaving room for max_gen_len tokens
        (at most half the context)."""
        keep = self.model.params.max_seq_len - min(max_gen_len, self.model.params.max_seq_len // 2)
        bos = getattr(self.tokenizer, "bos_id", None)
        out = []
        for p in prompts:
            head = [bos] if len(p) > keep and p[0] == bos else []
            out.append(p if len(p) <= keep else head + p[len(p) - keep + len(head):])
        return out

    def text_completion(self, prompts: List[str], *, max_gen_len: Optional[int] = None, temperature: float = 0.6,
                        top_p: float = 0.9, top_k: int = 0, logprobs: bool = False, echo: bool = False,
                        truncate: bool = False) -> List[dict]:
        """[{"generation": str}] per prompt; with logprobs also "tokens" (one string each) and "logprobs"."""
        check_prompts(prompts)
        check_max_gen_len(max_gen_len)
        max_gen_len = self.model.params.max_seq_len - 1 if max_gen_len is None else max_gen_len
        prompt_tokens = [self.encode_prompt(x) for x in prompts]
        if truncate:
            prompt_tokens = self.truncate_prompts(prompt_tokens, max_gen_len)
        tokens, lps = self.generate(prompt_tokens, max_gen_len, temperature=temperature, top_p=top_p, top_k=top_k,
                                    logprobs=logprobs, echo=echo)
        if logprobs:
            return [{"generation": self.tokenizer.decode(t), "tokens": [self.tokenizer.decode([x]) for x in t],
                     "logprobs": lp} for t, lp in zip(tokens, lps)]
        return [{"generation": self.tokenizer.decode(t)} for t in tokens]

    def chat_completion(self, dialogs: List[List[dict]], *, max_gen_len: Optional[int] = None,
                        temperature: float = 0.6, top_p: float = 0.9, top_k: int = 0, logprobs: bool = False,
                        truncate: bool = False, tools: Optional[list] = None, tool_prompt_format: str = "json",
                        today: Optional[str] = None) -> List[dict]:
        """[{"generation": {"role": "assistant", "content": str, "tool_calls": [...], "stop_reason": str}}]
        per dialog, in the model's chat format. `tools` (Llama 3.1: built-in names, Meta's or OpenAI's
        definitions; see llama/tokenizer/tools.py), `tool_prompt_format` ("json", "function_tag") and
        `today` ("21 September 2024") make the system block of Meta's prompt format. A reply that calls
        a tool has it in tool_calls (OpenAI's shape) and stop_reason "end_of_message" when the model
        awaits the result (Meta's names; also "end_of_turn", "out_of_tokens"). Append the reply and a
        {"role": "tool", "tool_call_id": ..., "content": result} message to continue the dialog."""
        check_dialogs(dialogs)
        check_max_gen_len(max_gen_len)
        max_gen_len = self.model.params.max_seq_len - 1 if max_gen_len is None else max_gen_len
        tool_args = dict(tools=tools, tool_prompt_format=tool_prompt_format, today=today)
        prompt_tokens = [self.encode_dialog(d, **tool_args) for d in dialogs]
        if truncate:
            prompt_tokens = self.truncate_prompts(prompt_tokens, max_gen_len)
        tokens, lps, stops = self._generate_until_stop(prompt_tokens, max_gen_len, temperature=temperature,
                                                       top_p=top_p, top_k=top_k, logprobs=logprobs, echo=False)
        results = []
        for i, t in enumerate(tokens):
            result = {"generation": self.decode_reply(t, stops[i], bool(tools))}
            if logprobs:
                result.update(tokens=[self.tokenizer.decode([x]) for x in t], logprobs=lps[i])
            results.append(result)
        return results

    def encode_dialog(self, dialog: List[dict], tools=None, tool_prompt_format: str = "json",
                      today: Optional[str] = None) -> List[int]:
        """The dialog's prompt ids in the model's chat format (tool arguments: Llama 3 formats only)."""
        fmt = self.tokenizer.chat_format
        if tools is None and today is None and tool_prompt_format == "json":
            encoded = fmt.encode_dialog_prompt(dialog)
        elif hasattr(fmt, "decode_assistant_message"):
            encoded = fmt.encode_dialog_prompt(dialog, tools=tools, tool_prompt_format=tool_prompt_format, today=today)
        else:
            raise ArgumentError(f"this model's chat format ({type(fmt).__name__}) has no tool calling: tools, "
                                "tool_prompt_format and today need a Llama 3.1 model (its chat format)")
        return list(getattr(encoded, "tokens", encoded))  # llama-models returns an object with .tokens

    def decode_reply(self, tokens: List[int], stop_token: Optional[int], tools: bool = False) -> dict:
        """A generated reply -> {"role": "assistant", "content", "tool_calls", "stop_reason"}; calls are
        read where the chat format has them (Llama 3) and tools were offered or <|python_tag|> opens it."""
        fmt = self.tokenizer.chat_format
        if hasattr(fmt, "decode_assistant_message"):
            return fmt.decode_assistant_message(tokens, stop_token, parse_calls=tools)
        return {"role": "assistant", "content": self.tokenizer.decode(tokens), "tool_calls": [],
                "stop_reason": "out_of_tokens" if stop_token is None else "end_of_turn"}

    # ------------------------------------------------------------------ streaming

    def stream(self, prompt_tokens: List[List[int]], max_gen_len: int, *, temperature: float = 0.6,
               top_p: float = 0.9, top_k: int = 0, top_n: int = 0) -> Iterator[Tuple[int, str, Token]]:
        """Yield (seq, text, token) per generated token: `text` is the new, final text of sequence
        `seq` ("" while a multi-byte character is incomplete; stop tokens give no text). The texts
        of one sequence join to exactly what generate() + decode returns."""
        from llama.tokenizer import StreamDecoder

        decoders = [StreamDecoder(self.tokenizer) for _ in prompt_tokens]
        stop = self.stop_tokens
        for tok in self.generate_tokens(prompt_tokens, max_gen_len, temperature=temperature, top_p=top_p,
                                        top_k=top_k, top_n=top_n):
            text = "" if tok.id in stop else decoders[tok.seq].push(tok.id)
            if tok.done:
                text += decoders[tok.seq].flush()
            yield tok.seq, text, tok
