"""python -m llama.serve: load a checkpoint once, serve OpenAI's API until Ctrl-C.

    python -m llama.serve --ckpt-dir Meta-Llama-3.1-8B-Instruct/ --port 8000
    python -m llama.serve                                # SmolLM2-135M-Instruct, fetched once

Bad flags end the program with one line on stderr and exit status 1 (as generate.py).
"""

from llama.common.threads import set_wait_policy

set_wait_policy()  # before torch loads OpenMP, which reads it once (llama/common/threads.py)

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from llama.common.errors import USER_ERRORS, ArgumentError, report  # noqa: E402
from llama.common.threads import POLICY_HELP  # noqa: E402
from llama.generation.cli import add_model_arguments, build_llama, check_model_args  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llama.serve", description="Serve a Llama checkpoint over "
                                "OpenAI's HTTP API (/v1/models, /v1/completions, /v1/chat/completions).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, epilog=POLICY_HELP)
    add_model_arguments(p, batch_help="requests decoded together (the KV cache holds this many); more wait")
    p.set_defaults(max_batch_size=4)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--model-name", help="the model id clients see (None: the checkpoint's file or directory name)")
    return p


def check_args(args) -> None:
    check_model_args(args)
    if not 0 <= args.port <= 65535:
        raise ArgumentError(f"--port {args.port}: use 1-65535 (0: any free port)")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        try:
            import uvicorn
            from llama.serve.app import create_app
        except ImportError as e:
            raise ArgumentError(f"the server needs FastAPI and uvicorn ({e.name} is missing): "
                                "pip install 'llama-ref[serve]'") from None
        from llama.serve.engine import Engine

        llama = build_llama(args, args.max_batch_size)
        engine = Engine(llama)
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            try:
                engine.run()  # the other model-parallel ranks follow rank 0's plan until it stops
            except KeyboardInterrupt:  # Ctrl-C reaches every rank under torchrun
                pass
            return 0
        name = args.model_name or Path(args.ckpt_dir).name
        thread = engine.start_thread()
        config = uvicorn.Config(create_app(llama, engine, name), host=args.host, port=args.port,
                                log_level="warning")
        server = uvicorn.Server(config)
        print(f"serving {name} on http://{args.host}:{args.port}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
        try:
            server.run()
        except KeyboardInterrupt:  # uvicorn shuts down, then passes Ctrl-C on: the way to stop a server
            pass
        engine.stop()
        thread.join(timeout=60)  # under torchrun the other ranks hear the stop from this thread
        return 0
    except USER_ERRORS as e:
        return report(e)


if __name__ == "__main__":
    sys.exit(main())
