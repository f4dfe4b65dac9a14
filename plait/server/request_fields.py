"""One policy for request fields Plait does not support (docs/serving.md, "Request fields").

Every field that SGLang's ``GenerateReqInput``/``SamplingParams``/OpenAI-route requests or
OpenAI's own request schemas define is accepted by the body models: Plait honours the ones it
supports, and the rest are listed in ``UNSUPPORTED`` below. Such a field is accepted while it
asks for nothing (null, an empty list or object, or one of the values listed, which mean what
Plait does anyway: ``false`` for a ``return_*`` flag) and is a 400 naming it otherwise, since
silently ignoring it would change what the client gets. A field nobody defines stays a 400
(the models forbid extra fields).

``unsupported_fields(...)`` turns a set of names from the table into a pydantic mixin, so the
request models in ``protocol.py`` apply the policy with no per-field code; the fields are
excluded from ``model_dump`` and so never reach the engine.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field, create_model
from pydantic_core import PydanticCustomError

# field -> the non-null values that ask for nothing beyond what Plait does (null, [] and {}
# always do). Several APIs define some of these names; one entry serves them all.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    # ---- SGLang GenerateReqInput (and SGLang's OpenAI-route requests)
    "session_id": (),
    "session_params": (),
    "input_embeds": (),
    "image_data": (),
    "video_data": (),
    "audio_data": (),
    "modalities": (["text"],),
    "mm_hashes": (),
    "mm_content_hashes": (),
    "use_audio_in_video": (False,),
    "video_config": (),
    "images_config": (),
    "mm_processor_kwargs": (),
    "max_dynamic_patch": (),
    "min_dynamic_patch": (),
    "image_max_dynamic_patch": (),
    "video_max_dynamic_patch": (),
    "need_wait_for_mm_inputs": (False,),
    "num_items_assigned": (),
    "encoder_urls": (),
    "token_ids_logprob": (),
    "return_sampling_mask": (False,),
    "sampling_logprobs_mode": (),
    "return_flat_raw_top_logprobs": (False,),
    "return_flat_raw_output_top_logprobs": (False,),
    # only modifies the flat arrays above (refused), so neither value asks for anything;
    # SGLang's own default is false on /generate and true on chat
    "return_flat_raw_top_logprobs_b64": (False, True),
    "return_hidden_states": (False,),
    "return_routed_experts": (False,),
    "routed_experts_start_len": (0,),
    "return_indexer_topk": (False,),
    "return_bytes": (False,),
    "return_entropy": (False,),
    "return_prompt_token_ids": (False,),
    "return_cached_tokens_details": (False,),
    "return_spec_tokens_details": (False,),
    "return_token_ids": (False,),
    "return_meta_info": (False,),
    "return_input_ids_in_sglext": (False,),
    "return_output_ids_in_sglext": (False,),
    "lora_path": (),  # OpenAI routes only: there the adapter is ``model``
    "lora_id": (),
    "custom_logit_processor": (),
    "custom_params": (),
    "positional_embed_overrides": (),
    "watermark": (),
    "bootstrap_pair_key": (),
    "decode_tp_size": (),
    "disagg_prefill_dp_rank": (0,),  # a Plait prefill server is rank 0 of one
    "routing_key": (),
    "conversation_id": (),
    "http_worker_ipc": (),
    "background": (False,),
    "require_reasoning": (False,),
    "max_thinking_tokens": (),
    "priority": (),
    "extra_key": (),
    "cache_salt": (),
    "custom_labels": (),
    "external_trace_header": (),
    "received_time": (),
    "multi_item_delimiter_indices": (),
    "token_indices_to_pool": (),
    "kv_hints": (),
    "input_ids": (),  # on chat only: SGLang's prompt ids in place of the messages
    "reasoning_effort": (),
    "thinking": (),
    "task": (),
    # ---- SGLang SamplingParams (in /generate's sampling_params, and on the OpenAI routes)
    "stop_regex": (),
    "beam_width": (1,),
    "structural_tag": (),
    "stream_interval": (),
    "sampling_seed": (),  # Plait's per-request seed is `seed`
    # ---- OpenAI completions / chat completions
    "suffix": ("",),
    "audio": (),
    "functions": (),
    "function_call": ("none", "auto"),
    "metadata": (),
    "store": (False,),
    "prediction": (),
    "moderation": (),
    "prompt_cache_options": (),
    "prompt_cache_retention": ("in_memory",),
    "service_tier": ("auto", "default"),
    "verbosity": ("medium",),
    "web_search_options": (),
    # stream_options: Plait never pads stream events
    "include_obfuscation": (False,),
}


# Which unsupported fields each request model declares (SGLang defines them there).
GENERATE = (
    "session_id",
    "input_embeds",
    "image_data",
    "video_data",
    "audio_data",
    "mm_hashes",
    "mm_content_hashes",
    "use_audio_in_video",
    "video_config",
    "watermark",
    "token_ids_logprob",
    "return_sampling_mask",
    "sampling_logprobs_mode",
    "return_flat_raw_top_logprobs",
    "return_flat_raw_output_top_logprobs",
    "return_flat_raw_top_logprobs_b64",
    "return_hidden_states",
    "return_routed_experts",
    "routed_experts_start_len",
    "return_indexer_topk",
    "modalities",
    "session_params",
    "lora_id",
    "custom_logit_processor",
    "positional_embed_overrides",
    "bootstrap_pair_key",
    "decode_tp_size",
    "disagg_prefill_dp_rank",
    "routing_key",
    "conversation_id",
    "http_worker_ipc",
    "background",
    "require_reasoning",
    "max_thinking_tokens",
    "priority",
    "extra_key",
    "custom_labels",
    "return_bytes",
    "return_entropy",
    "return_prompt_token_ids",
    "external_trace_header",
    "received_time",
    "need_wait_for_mm_inputs",
    "num_items_assigned",
    "encoder_urls",
    "max_dynamic_patch",
    "min_dynamic_patch",
    "image_max_dynamic_patch",
    "video_max_dynamic_patch",
    "images_config",
    "mm_processor_kwargs",
    "multi_item_delimiter_indices",
    "token_indices_to_pool",
    "cache_salt",
    "kv_hints",
)
SAMPLING = (
    "stop_regex",
    "beam_width",
    "structural_tag",
    "stream_interval",
    "sampling_seed",
    "custom_params",
    "watermark",
)
OPENAI = (  # completions and chat
    "disagg_prefill_dp_rank",
    "return_hidden_states",
    "return_routed_experts",
    "routed_experts_start_len",
    "return_cached_tokens_details",
    "return_spec_tokens_details",
    "return_token_ids",
    "return_bytes",
    "return_entropy",
    "background",
    "stop_regex",
    "lora_path",
    "session_id",
    "session_params",
    "custom_params",
    "custom_logit_processor",
    "watermark",
    "images_config",
    "mm_processor_kwargs",
    "extra_key",
    "cache_salt",
    "priority",
    "custom_labels",
)
COMPLETION = ("suffix",)
CHAT = (
    "audio",
    "functions",
    "function_call",
    "metadata",
    "store",
    "prediction",
    "moderation",
    "prompt_cache_options",
    "prompt_cache_retention",
    "service_tier",
    "verbosity",
    "web_search_options",
    "modalities",
    "reasoning_effort",
    "thinking",
    "task",
    "return_prompt_token_ids",
    "return_meta_info",
    "return_input_ids_in_sglext",
    "return_output_ids_in_sglext",
    "return_sampling_mask",
    "sampling_logprobs_mode",
    "return_flat_raw_output_top_logprobs",
    "return_flat_raw_top_logprobs_b64",
    "max_dynamic_patch",
    "min_dynamic_patch",
    "use_audio_in_video",
    "video_config",
    "input_ids",
)
STREAM_OPTIONS = ("include_obfuscation",)


def asks_for_nothing(name: str, value: Any) -> bool:
    """True when ``value`` of unsupported field ``name`` requests no behaviour Plait lacks.
    Types must match too: ``0`` is not ``false`` and ``1`` is not ``true``."""
    if value is None or (type(value) in (list, dict) and not value):
        return True
    return any(type(value) is type(ok) and value == ok for ok in UNSUPPORTED[name])


def _describe(name: str) -> str:
    import json

    allowed = ["null"] + [json.dumps(v) for v in UNSUPPORTED[name]]
    return " or ".join(allowed)


def _checker(name: str):
    def check(value: Any) -> Any:
        if not asks_for_nothing(name, value):
            raise PydanticCustomError(
                "unsupported_field",
                "not supported by Plait; only {allowed} is accepted",
                {"allowed": _describe(name)},
            )
        return value

    return check


def _schema_of(name: str) -> dict[str, Any]:
    """The values ``asks_for_nothing`` accepts, as JSON Schema (so a schema-driven client
    or fuzzer sends only those)."""
    alts: list[dict[str, Any]] = [
        {"type": "null"},
        {"type": "array", "maxItems": 0},
        {"type": "object", "maxProperties": 0},
    ]
    if UNSUPPORTED[name]:
        alts.append({"enum": list(UNSUPPORTED[name])})
    return {"anyOf": alts}


def unsupported_fields(model_name: str, *names: str) -> type[BaseModel]:
    """A mixin declaring ``names`` (each must be in ``UNSUPPORTED``) as fields that validate
    by ``asks_for_nothing`` and are left out of ``model_dump``."""
    missing = [n for n in names if n not in UNSUPPORTED]
    if missing:
        raise KeyError(f"not in UNSUPPORTED: {missing}")
    fields: dict[str, Any] = {
        n: (
            Annotated[Any, AfterValidator(_checker(n))],
            Field(default=None, exclude=True, json_schema_extra=_schema_of(n)),
        )
        for n in names
    }
    return create_model(model_name, **fields)


UnsupportedGenerate = unsupported_fields("UnsupportedGenerate", *GENERATE)
UnsupportedSampling = unsupported_fields("UnsupportedSampling", *SAMPLING)
UnsupportedOpenAI = unsupported_fields("UnsupportedOpenAI", *OPENAI)
UnsupportedCompletion = unsupported_fields("UnsupportedCompletion", *COMPLETION)
UnsupportedChat = unsupported_fields("UnsupportedChat", *CHAT)
UnsupportedStreamOptions = unsupported_fields("UnsupportedStreamOptions", *STREAM_OPTIONS)
