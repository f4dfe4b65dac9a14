"""OpenAI tool calling: the request fields (``protocol``), how calls are written by each model
family (``parsers``), how a prompt carries the tools (``prompt``), and the decoding constraint
that makes a call always parse (``constrained``)."""
