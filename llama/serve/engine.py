"""Continuous batching: many requests share each decode step.

The KV cache has max_batch_size slots. A request takes a free slot, its prompt is prefilled into that
slot alone (Llama._prefill), and from then on it advances one token per step together with every
other live request, each at its own position (the model takes a tensor of positions, as in
Llama.generate). A request that ends frees its slot at once and a waiting one takes it before the
next step: nobody waits for the longest request of a batch. Free slots ride along at position 0
(they only ever write their own, unused, cache row).

Each request samples with its own settings and, given a seed, its own generator, so a seeded
request draws the same tokens whatever it is batched with. Under torchrun (model parallel) rank 0
decides what each iteration does (which requests join, which were cancelled) and broadcasts it; every
rank then does the same work, and rank 0's sampled ids are broadcast as in Llama._sample.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from llama import parallel
from llama.generation.compile import mark_cache_dynamic
from llama.generation.generator import cache_slot
from llama.generation.sampling import sample


@dataclass
class Request:
    """One generation: the prompt's ids and how to sample. `emit(event)` receives, from the engine's
    thread, a TokenEvent per generated token (the last one has done=True)."""

    prompt: List[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    top_n: int = 0  # how many alternatives (with log-probabilities) to report per token
    emit: Optional[Callable] = field(default=None, repr=False)
    cancelled: bool = False  # set by the consumer (client gone, a stop string seen): frees the slot

    def plan(self) -> tuple:
        """What other ranks need to do the same work (no callbacks)."""
        return (self.prompt, self.max_tokens, self.temperature, self.top_p, self.top_k, self.seed, self.top_n)


@dataclass
class TokenEvent:
    id: int
    logprob: float  # log p(id | prefix) under the model (no temperature)
    top: List[tuple]  # [(id, logprob)] of the top_n likeliest tokens
    done: bool
    stopped: bool  # done on a stop token (False: the length limit or a cancel)
    steps: int = 0  # decode steps the engine had run when this token was chosen (shared-step evidence)


@dataclass
class _Live:
    request: Request
    generator: torch.Generator
    budget: int
    generated: int = 0


class Engine:
    """Serves Requests from any thread: `submit(request)`; `run()` is the loop (a thread on rank 0,
    the main loop on other ranks); `stop()` ends it."""

    def __init__(self, llama):
        self.llama = llama
        params = llama.model.params
        self.batch, self.max_seq_len = params.max_batch_size, params.max_seq_len
        self.device = llama.device
        self.cache = llama.model.make_cache(self.batch, self.max_seq_len)
        if llama.compiled:
            mark_cache_dynamic(self.cache)
        self.positions = torch.zeros(self.batch, dtype=torch.long, device=self.device)  # next write, per slot
        self.last = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)  # the token to feed, per slot
        self.slots: List[Optional[_Live]] = [None] * self.batch
        self.pending: "queue.Queue[Optional[Request]]" = queue.Queue()
        self.stop_tokens = llama.stop_tokens
        self.shared_generator = torch.Generator(self.device).manual_seed(torch.initial_seed() % 2**63)
        self.steps = 0
        self.rank0 = parallel.is_first_rank()
        self.failure: Optional[BaseException] = None
        self.stopping = False

    def submit(self, request: Request) -> None:
        if self.failure is not None:
            raise RuntimeError(f"the engine stopped: {self.failure!r}")
        self.pending.put(request)

    def stop(self) -> None:
        """End the loop once the requests already submitted are done."""
        self.pending.put(None)

    def start_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="llama-engine", daemon=True)
        thread.start()
        return thread

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        try:
            with torch.inference_mode():
                while (plan := self._plan()) is not None:
                    cancelled, admitted = plan
                    for b in cancelled:
                        self._finish(b, TokenEvent(0, 0.0, [], True, False, self.steps), emit=False)
                    for b, request in admitted:
                        self._admit(b, request)
                    if any(self.slots):
                        self._step()
        except BaseException as e:  # a bug: tell every waiting client instead of leaving it hanging
            self.failure = e
            for b, live in enumerate(self.slots):
                if live is not None and live.request.emit is not None:
                    live.request.emit(e)
            while not self.pending.empty():
                request = self.pending.get_nowait()
                if request is not None and request.emit is not None:
                    request.emit(e)
            raise

    def _plan(self):
        """Rank 0: (slots to cancel, [(slot, request)] to admit), waiting for work when idle; None to
        stop. Other ranks receive rank 0's plan."""
        if self.rank0:
            plan = self._take()
        if parallel.model_parallel_size() > 1:
            box = [None if plan is None else (plan[0], [(b, r.plan()) for b, r in plan[1]])] if self.rank0 else [None]
            torch.distributed.broadcast_object_list(box, src=0)
            if not self.rank0:
                plan = box[0] and (box[0][0], [(b, Request(*p)) for b, p in box[0][1]])
        return plan

    def _take(self):
        cancelled = [b for b, live in enumerate(self.slots) if live is not None and live.request.cancelled]
        free = [b for b, live in enumerate(self.slots) if live is None or b in cancelled]
        admitted = []
        idle = len(free) == self.batch and not cancelled
        while free:
            if self.stopping and idle and not admitted and self.pending.empty():
                return None  # stop() was called and everything before it is done
            try:  # block only when there is nothing else to do
                request = self.pending.get(block=idle and not admitted and not self.stopping)
            except queue.Empty:
                break
            if request is None:
                self.stopping = True
                continue
            if request.cancelled:
                continue
            admitted.append((free.pop(0), request))
        return cancelled, admitted

    def _admit(self, b: int, request: Request) -> None:
        if self.llama.compiled:
            self.llama._decode.check()  # per request, as Llama.generate: weights reassigned since compiling
        logits = self.llama._prefill(request.prompt, cache_slot(self.cache, b), None)  # (V,)
        generator = self.shared_generator if request.seed is None else \
            torch.Generator(self.device).manual_seed(request.seed)
        budget = min(request.max_tokens, self.max_seq_len - len(request.prompt))
        self.slots[b] = _Live(request, generator, budget)
        self.positions[b] = len(request.prompt)
        self._choose([b], logits[None])

    def _step(self) -> None:
        active = [b for b, live in enumerate(self.slots) if live is not None]
        logits = self.llama._decode(self.last, self.positions, self.cache)  # (B, V)
        self.steps += 1
        self.positions[active] += 1
        self._choose(active, logits[active])

    def _choose(self, slots: List[int], logits: torch.Tensor) -> None:
        """Sample the next token of each of `slots` from its logits row (len(slots), V)."""
        ids = torch.stack([sample(logits[i : i + 1], live.request.temperature, live.request.top_p,
                                  live.request.top_k, live.generator)[0]
                           for i, live in enumerate(self.slots[b] for b in slots)])
        if parallel.model_parallel_size() > 1:  # rank 0's choice for all, as Llama._sample does
            group = parallel.model_parallel_group()
            torch.distributed.broadcast(ids, torch.distributed.get_global_rank(group, 0), group=group)
        logp = torch.log_softmax(logits.float(), dim=-1)  # (n, V)
        chosen = logp.gather(-1, ids[:, None])[:, 0].tolist()
        for i, (b, token) in enumerate(zip(slots, ids.tolist())):
            live = self.slots[b]
            live.generated += 1
            top_n = live.request.top_n
            top = list(zip(*[t.tolist() for t in logp[i].topk(top_n)][::-1])) if top_n else []
            stopped = token in self.stop_tokens
            event = TokenEvent(token, chosen[i], top, stopped or live.generated >= live.budget, stopped, self.steps)
            if event.done:
                self._finish(b, event)
            else:
                self.last[b, 0] = token
                if live.request.emit is not None:
                    live.request.emit(event)

    def _finish(self, b: int, event: TokenEvent, emit: bool = True) -> None:
        live = self.slots[b]
        self.slots[b] = None
        self.positions[b] = 0
        self.last[b, 0] = 0
        if emit and live.request.emit is not None:
            live.request.emit(event)
