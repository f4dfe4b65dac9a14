"""``plait serve --grpc-mode``: SGLang's scheduler service (``smg-grpc-proto``) on Plait's engine.

In this mode the gateway (``smg``) tokenizes, applies the chat template and parses tool calls
and reasoning; a worker runs token-in/token-out generation only. The service is the one
SGLang's own ``--grpc-mode`` serves, from the stubs ``smg-grpc-proto`` generates
(``sglang.grpc.scheduler.SglangScheduler``), so the gateway talks to a Plait worker as to an
SGLang one.

- ``convert``: proto requests to core messages (the core's checks, errors naming the field)
  and engine outputs to proto responses.
- ``servicer``: the RPCs.
- ``server``: the process (engine client, gRPC server, health service, drain on SIGTERM).
"""
