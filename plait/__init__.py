"""Plait: program LLMs with an SGLang-compatible language and serve them on any accelerator."""
from plait.core.engine import Engine
from plait.core.sampling_params import SamplingParams
from plait.frontend import (
    REGEX_BOOL,
    REGEX_FLOAT,
    REGEX_INT,
    REGEX_STR,
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
    greedy_token_selection,
    select,
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
from plait.frontend import __all__ as _frontend_all

__all__ = ["Engine", "SamplingParams", *_frontend_all]
