"""Plait: program LLMs with an SGLang-compatible language and serve them on any accelerator."""

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

try:  # SGLang programs print and compare `sgl.__version__`
    from importlib.metadata import version as _version

    __version__ = _version("plait")
except ImportError:  # PackageNotFoundError: a source tree that was never installed
    __version__ = "0.0.0+unknown"

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
