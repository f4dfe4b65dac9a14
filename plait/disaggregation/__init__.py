"""Prefill/decode disaggregation, driven by SGLang's gateway (``--pd-disaggregation``).

The gateway sends every request to a prefill server and a decode server with the same
``bootstrap_host``/``bootstrap_port``/``bootstrap_room``. The decode server pre-allocates KV
for the prompt and tells the prefill server (through the bootstrap socket on the prefill side)
where to write; the prefill server runs the prompt (radix cache included), writes the KV and
the first sampled token straight into the decode server's memory with a :class:`KVTransfer`
(Mooncake's transfer engine), then notifies the decode server, which decodes from there.

Modules: ``transfer`` (the interface and the in-process fake), ``mooncake`` (the real one),
``transports`` (choosing one by name),
``bootstrap`` (the control messages and their sockets), ``prefill`` and ``decode`` (each
side's state machine, run on the engine's scheduler thread).
"""
