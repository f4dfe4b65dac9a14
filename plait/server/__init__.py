"""``plait serve``: an HTTP server for ``plait.Engine`` speaking OpenAI's API and SGLang's.

Two processes. The HTTP process (``http_server.py``, FastAPI + uvicorn) parses, validates,
tokenizes and streams; the scheduler process (``scheduler_process.py``) owns the engine, whose
own thread runs continuous batching. They talk over ZeroMQ (``engine_client.py`` is the HTTP
side). So JSON, chat templates and slow clients never delay a forward pass.

Routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (``openai_api.py``);
``/generate`` (``generate_api.py``); ``/get_model_info``, ``/get_server_info`` (alias
``/server_info``), ``/flush_cache``, ``/abort_request``, ``/health``, ``/health_generate``,
``/metrics`` (``http_server.py``, ``metrics.py``). Every error is ``{"error": {"message",
"type", "param", "code"}}`` (``protocol.py``). Both APIs build the core's request messages
(``plait.core.messages``) and run its checks through ``submit.py``, which maps their
``ValueError`` to a 400; the messages cross to the scheduler process as they are.
"""
