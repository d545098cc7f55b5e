"""The HTTP API (FastAPI): /v1/models, /v1/completions, /v1/chat/completions, as OpenAI's.

Each request is checked (protocol.py), encoded in the model's chat format (tools included), and
handed to the Engine, whose thread sends back one event per token; the handler turns them into text
(StreamDecoder: never half a character), cuts at a `stop` string, and answers in one JSON body or
as server-sent events (stream: true). A reply that calls a tool is held back while it could still be
one and answered as `tool_calls`. Beyond OpenAI's fields each choice carries "token_ids" (the
generated ids, stop token excluded) so that clients can compare ids, not only text.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from llama.common.checks import check_dialogs
from llama.common.errors import UserError
from llama.serve.engine import Request, TokenEvent
from llama.serve.protocol import (APIError, chat_logprobs, chat_request, completion_logprobs, completion_prompt,
                                  envelope, new_id, sampling, usage)
from llama.tokenizer import StreamDecoder

MAX_BODY_BYTES = 8 << 20


class Reply:
    """The text of one generated reply, event by event: what may be shown now, and the whole at the end."""

    def __init__(self, tokenizer, stop: list, hold_calls: bool, chat: bool = True):
        self.tokenizer, self.stop, self.hold_calls = tokenizer, stop, hold_calls
        self.decoder = StreamDecoder(tokenizer)
        # a chat reply opening with <|python_tag|> is a call (completions show the raw text)
        self.tag = getattr(tokenizer, "special_tokens", {}).get("<|python_tag|>") if chat else None
        self.ids, self.events, self.text, self.sent = [], [], "", 0
        self.stop_token, self.stop_hit, self.done = None, False, False

    def push(self, event: TokenEvent) -> str:
        """Take one token; return the text now safe to show."""
        self.events.append(event)
        if event.stopped:
            self.stop_token = event.id
        else:
            self.ids.append(event.id)
            self.text += self.decoder.push(event.id)
        if event.done:
            self.text += self.decoder.flush()
            self.done = True
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:  # a stop string: the reply ends before it
            self.text, self.stop_hit, self.done = self.text[:cut], True, True
        if not self.done and self.maybe_call():
            return ""
        # hold back what could be the start of a stop string
        safe = len(self.text) if self.done else len(self.text) - max((len(s) - 1 for s in self.stop), default=0)
        if self.done and self.maybe_call():
            return ""  # the caller decides: a tool call, or this text
        out = self.text[self.sent : max(safe, self.sent)]
        self.sent += len(out)
        return out

    def maybe_call(self) -> bool:
        """Could this reply (so far) be a tool call? Its text is held back while it could."""
        if self.ids[:1] == [self.tag] and self.tag is not None:
            return True
        if not self.hold_calls:
            return False
        head = self.text.lstrip()
        return head == "" or head.startswith(("{", "<function")) or "<function".startswith(head)

    def finish_reason(self, calls: bool) -> str:
        if calls:
            return "tool_calls"
        return "stop" if self.stop_hit or self.stop_token is not None else "length"


class API:
    """The routes' work, over one Llama and its Engine (create_app registers them)."""

    def __init__(self, llama, engine, model_name: str):
        self.llama, self.engine, self.model_name = llama, engine, model_name
        self.tokenizer, self.max_seq_len = llama.tokenizer, llama.model.params.max_seq_len

    async def read_json(self, request: HTTPRequest) -> dict:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise APIError(f"the request body has {len(body)} bytes; at most {MAX_BODY_BYTES}", status=413)
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(f"the request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise APIError("the request body must be a JSON object")
        return data

    def check_fits(self, prompt, s) -> None:
        """Refuse (400) a prompt that leaves no room, or max_tokens past the context."""
        try:
            self.llama.check_request([prompt], s.max_tokens or 1)
        except UserError as e:
            raise APIError(str(e), "messages", code="context_length_exceeded") from None
        if s.max_tokens is not None and len(prompt) + s.max_tokens > self.max_seq_len:
            raise APIError(f"the prompt has {len(prompt)} tokens and max_tokens is {s.max_tokens}: together more "
                           f"than the context ({self.max_seq_len}); lower max_tokens", "max_tokens",
                           code="context_length_exceeded")

    def start(self, prompt, s, emit_loop, queue) -> Request:
        request = Request(prompt, s.max_tokens or self.max_seq_len - len(prompt), s.temperature, s.top_p, 0, s.seed,
                          s.top_logprobs, emit=lambda event: emit_loop.call_soon_threadsafe(queue.put_nowait, event))
        self.engine.submit(request)
        return request

    async def events(self, request: Request, queue: asyncio.Queue):
        while True:
            event = await queue.get()
            if isinstance(event, BaseException):
                raise APIError("the server failed while generating", status=500, type="server_error")
            yield event
            if event.done:
                return

    async def run(self, prompt, s, reply: Reply, on_text=None):
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        request = self.start(prompt, s, loop, queue)
        try:
            async for event in self.events(request, queue):
                text = reply.push(event)
                if on_text is not None:
                    await on_text(text, event)
                if reply.done:
                    break
        finally:
            request.cancelled = True  # a stop string, or the client went away: free the slot

    async def models(self):
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "llama-ref", "max_model_len": self.max_seq_len}]}

    async def completions(self, http: HTTPRequest):
        body = await self.read_json(http)
        prompt_text, s = completion_prompt(body), sampling(body, self.max_seq_len, 16, chat=False)
        prompt = self.llama.encode_prompt(prompt_text)
        self.check_fits(prompt, s)
        ident = new_id("cmpl")
        if s.stream:
            return sse(self.stream_completion(prompt, s, ident))
        reply = Reply(self.tokenizer, s.stop, hold_calls=False, chat=False)
        await self.run(prompt, s, reply)
        choice = {"index": 0, "text": reply.text, "finish_reason": reply.finish_reason(False),
                  "logprobs": completion_logprobs(self.tokenizer, reply.events[: len(reply.ids)]) if s.logprobs else None,
                  "token_ids": reply.ids}
        return envelope("text_completion", ident, self.model_name, [choice], usage=usage(len(prompt), len(reply.events)))

    async def stream_completion(self, prompt, s, ident):
        reply, out = Reply(self.tokenizer, s.stop, hold_calls=False, chat=False), asyncio.Queue()

        async def on_text(text, event):
            lp = completion_logprobs(self.tokenizer, [event]) if s.logprobs and not event.stopped else None
            if text or lp:
                await out.put({"index": 0, "text": text, "finish_reason": None, "logprobs": lp})
        async for choice in pump(self.run(prompt, s, reply, on_text), out):
            yield envelope("text_completion", ident, self.model_name, [choice])
        yield envelope("text_completion", ident, self.model_name,
                       [{"index": 0, "text": "", "finish_reason": reply.finish_reason(False), "logprobs": None}],
                       **({"usage": usage(len(prompt), len(reply.events))} if s.include_usage else {}))

    async def chat_completions(self, http: HTTPRequest):
        body = await self.read_json(http)
        req = chat_request(body, self.max_seq_len)
        try:
            check_dialogs([req.messages])
            prompt = self.llama.encode_dialog(req.messages, tools=req.tools)
        except UserError as e:
            raise APIError(str(e), "messages") from None
        self.check_fits(prompt, req.sampling)
        ident = new_id("chatcmpl")
        if req.sampling.stream:
            return sse(self.stream_chat(prompt, req, ident))
        reply = Reply(self.tokenizer, req.sampling.stop, hold_calls=bool(req.tools))
        await self.run(prompt, req.sampling, reply)
        message = self.chat_message(reply, req)
        choice = {"index": 0, "message": message, "finish_reason": reply.finish_reason("tool_calls" in message),
                  "logprobs": chat_logprobs(self.tokenizer, reply.events[: len(reply.ids)]) if req.sampling.logprobs
                  else None, "token_ids": reply.ids}
        return envelope("chat.completion", ident, self.model_name, [choice],
                        usage=usage(len(prompt), len(reply.events)))

    def chat_message(self, reply: Reply, req) -> dict:
        """The finished reply as OpenAI's message: tool_calls where it is one, else its text."""
        if not reply.stop_hit:
            message = self.llama.decode_reply(reply.ids, reply.stop_token, bool(req.tools))
            if message["tool_calls"]:
                return {"role": "assistant", "content": message["content"] or None,
                        "tool_calls": message["tool_calls"]}
        return {"role": "assistant", "content": reply.text}

    async def stream_chat(self, prompt, req, ident):
        s = req.sampling
        reply, out = Reply(self.tokenizer, s.stop, hold_calls=bool(req.tools)), asyncio.Queue()
        yield envelope("chat.completion.chunk", ident, self.model_name,
                       [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])

        async def on_text(text, event):
            if text:
                lp = chat_logprobs(self.tokenizer, [event]) if s.logprobs and not event.stopped else None
                await out.put({"index": 0, "delta": {"content": text}, "finish_reason": None, "logprobs": lp})
        async for choice in pump(self.run(prompt, s, reply, on_text), out):
            yield envelope("chat.completion.chunk", ident, self.model_name, [choice])
        message = self.chat_message(reply, req)
        calls = "tool_calls" in message
        if calls:
            delta = {"tool_calls": [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]}
        else:  # text held back while it might have been a call
            delta = {"content": message["content"][reply.sent:]} if len(message["content"]) > reply.sent else {}
        yield envelope("chat.completion.chunk", ident, self.model_name,
                       [{"index": 0, "delta": delta, "finish_reason": reply.finish_reason(calls)}])
        if s.include_usage:
            yield envelope("chat.completion.chunk", ident, self.model_name, [], usage=usage(len(prompt), len(reply.events)))




def create_app(llama, engine, model_name: str) -> FastAPI:
    """The FastAPI app: OpenAI's routes over `llama` and its running `engine`."""
    app = FastAPI(title="llama-ref", docs_url=None, redoc_url=None, openapi_url=None)
    api = API(llama, engine, model_name)
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"])

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):  # unknown routes and methods, in OpenAI's error shape
        return JSONResponse(APIError(str(e.detail), status=e.status_code).body(), status_code=e.status_code)

    return app


async def pump(work, out: asyncio.Queue):
    """Run `work` (which puts items on `out`) and yield the items as they come, then re-raise its error."""
    task = asyncio.ensure_future(work)
    try:
        while not (task.done() and out.empty()):
            getter = asyncio.ensure_future(out.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield getter.result()
            else:
                getter.cancel()
        task.result()
    finally:
        task.cancel()


def sse(chunks) -> StreamingResponse:
    """Server-sent events: one `data: {json}` per chunk, then `data: [DONE]`. An error after the first
    byte can no longer change the status: it is sent as an event with OpenAI's error body."""
    async def body():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream")
