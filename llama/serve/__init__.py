"""An OpenAI-compatible HTTP server for any checkpoint this library loads (docs/serving.md).

    python -m llama.serve --ckpt-dir DIR --host 127.0.0.1 --port 8000
    torchrun --nproc_per_node 2 -m llama.serve --ckpt-dir DIR     # model parallel; rank 0 serves HTTP

    __main__.py  the command line (generate.py's model flags, plus --host/--port)
    app.py       the FastAPI routes: /v1/models, /v1/completions, /v1/chat/completions (SSE streaming)
    protocol.py  OpenAI's request checks, error JSON and response shapes
    engine.py    continuous batching: concurrent requests share every decode step

Needs the [serve] extra (FastAPI + uvicorn). Binds to 127.0.0.1 unless --host says otherwise; a
request is JSON only and never names a file.
"""
