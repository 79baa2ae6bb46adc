"""The OpenAI-compatible HTTP server (`xpu-coopt serve`), on FastAPI and uvicorn (xpu_coopt[serve]).

- async_engine.py: the engine stepping in a thread of its own, each request's tokens streamed to asyncio
- protocol.py: the requests' schemas and OpenAI's error object
- metrics.py: the Prometheus metrics (/metrics)
- app.py: the routes: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics
"""
