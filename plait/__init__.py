"""Plait: program LLMs with an SGLang-compatible language and serve them on any accelerator.

The public names resolve lazily (PEP 562): ``import plait.server.cli`` or the HTTP process must
not pay for torch (pulled in by ``plait.core.engine``) before it needs an engine, and
``import plait`` alone stays cheap. ``from plait import Engine`` and ``plait.gen`` behave as
eager imports did: the first access imports the defining module and caches the name here.
"""

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

if _TYPE_CHECKING:
    from plait.core.engine import Engine
    from plait.core.sampling_params import SamplingParams
    from plait.frontend import (
        REGEX_BOOL,
        REGEX_FLOAT,
        REGEX_INT,
        REGEX_STR,
        Crusoe,
        OpenAI,
        ProgramState,
        ProgramStateGroup,
        Runtime,
        RuntimeEndpoint,
        assistant,
        assistant_begin,
        assistant_end,
        flush_cache,
        function,
        gen,
        gen_int,
        gen_string,
        get_default_backend,
        get_server_info,
        global_config,
        greedy_token_selection,
        select,
        separate_reasoning,
        set_default_backend,
        system,
        system_begin,
        system_end,
        token_length_normalized,
        unconditional_likelihood_normalized,
        user,
        user_begin,
        user_end,
    )
    from plait.server.server_args import ServerArgs

__all__ = [
    "Crusoe",
    "Engine",
    "OpenAI",
    "ProgramState",
    "ProgramStateGroup",
    "REGEX_BOOL",
    "REGEX_FLOAT",
    "REGEX_INT",
    "REGEX_STR",
    "Runtime",
    "RuntimeEndpoint",
    "SamplingParams",
    "ServerArgs",
    "__version__",
    "assistant",
    "assistant_begin",
    "assistant_end",
    "flush_cache",
    "function",
    "gen",
    "gen_int",
    "gen_string",
    "get_default_backend",
    "get_server_info",
    "global_config",
    "greedy_token_selection",
    "select",
    "separate_reasoning",
    "set_default_backend",
    "system",
    "system_begin",
    "system_end",
    "token_length_normalized",
    "unconditional_likelihood_normalized",
    "user",
    "user_begin",
    "user_end",
]

# Where the names outside the DSL live; every other public name but __version__ is
# plait.frontend's.
_HOMES = {
    "Engine": "plait.core.engine",
    "SamplingParams": "plait.core.sampling_params",
    "ServerArgs": "plait.server.server_args",
}
__version__: str  # bound by __getattr__ on first use


def _version() -> str:
    """SGLang programs print and compare ``sgl.__version__``; importlib.metadata costs ~0.1 s."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("plait")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0.0.0+unknown"


def __getattr__(name: str) -> _Any:
    if name == "__version__":
        globals()[name] = value = _version()
        return value
    if name not in __all__:
        raise AttributeError(f"module 'plait' has no attribute {name!r}")
    value = getattr(_importlib.import_module(_HOMES.get(name, "plait.frontend")), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
