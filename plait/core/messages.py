"""The one typed request, from the HTTP layer and the frontend down to ``Req``.

The HTTP routes and the frontend build these dataclasses; the server pickles them over its
ZeroMQ link as they are; the engine turns a ``GenerateReq`` into ``Req`` objects in one place
(``Engine.make_requests``). Nobody else restates a request's fields.

A ``GenerateReq`` is one prompt. SGLang's batch form (a list of prompts, with one value or one
per prompt for every other field) is unpacked by :meth:`GenerateReq.batch`; ``n > 1`` by
:meth:`GenerateReq.expand`. Every check of a request lives here or in ``SamplingParams`` and
raises ``ValueError`` whose message starts with the parameter's name, which is how the HTTP
layer names it in its 400 (``plait.server.protocol.param_of``).
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from plait.core.sampling_params import SamplingParams

_PROMPT_FIELDS = ("text", "input_ids")
_ROOM_STRIDE = 0x9E3779B97F4A7C15  # odd, so samples 0..n-1 of one room never coincide


@dataclass(frozen=True, kw_only=True)
class RequestLimits:
    """What a request must fit. ``None`` means unknown where the check runs: not checked."""

    context_len: int | None = None
    vocab_size: int | None = None
    max_total_tokens: int | None = None  # KV pool size; a prompt must fit it alone
    # Bounds on the work one request may ask for (a server's policy; the offline engine
    # leaves them unset): top_logprobs_num per position, and prompts x n per request.
    max_top_logprobs: int | None = None
    max_sequences: int | None = None


@dataclass(frozen=True)
class Bootstrap:
    """Where the prefill half of a disaggregated request meets its decode half: SGLang's
    gateway adds the same three fields to both (``plait.disaggregation``). ``room`` is the
    request's id on the prefill server's bootstrap socket at ``host:port``."""

    host: str
    port: int
    room: int

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"bootstrap_host must be a non-empty string, got {self.host!r}")
        if not _is_int(self.port) or not 0 < self.port < 65536:
            raise ValueError(f"bootstrap_port must be a port number, got {self.port!r}")
        if not _is_int(self.room) or self.room < 0:
            raise ValueError(f"bootstrap_room must be a non-negative integer, got {self.room!r}")

    def sample(self, i: int) -> "Bootstrap":
        """The pairing of sample ``i`` of an ``n > 1`` request: both halves expand ``n`` the
        same way, so each sample gets a room of its own that both derive from the gateway's
        one (sample 0 keeps it; the others are spread over the 63-bit room space, where the
        gateway's random rooms make a collision as unlikely as between two requests)."""
        if i == 0:
            return self
        return dataclasses.replace(self, room=(self.room + i * _ROOM_STRIDE) % 2**63)


@dataclass
class GenerateReq:
    """One prompt to generate from (``sampling_params.n`` samples of it).

    Exactly one of ``text`` and ``input_ids`` is set; :meth:`tokenized` turns text into ids.
    ``sampling_params`` accepts a dict (or ``None``) and is always a validated
    ``SamplingParams`` afterwards. ``rid=None`` means "assign one" (done by :meth:`expand`).
    """

    text: str | None = None
    input_ids: list[int] | None = None
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    rid: str | None = None
    return_logprob: bool = False
    logprob_start_len: int = -1  # -1: no prompt logprobs
    top_logprobs_num: int = 0
    stream: bool = False
    bootstrap: Bootstrap | None = None  # set by SGLang's gateway in PD mode
    lora_path: str | None = None  # a loaded LoRA adapter's name (None: the base model)

    def __post_init__(self) -> None:
        sp = self.sampling_params
        if isinstance(sp, SamplingParams):
            sp.normalize()
        else:
            self.sampling_params = SamplingParams.from_dict(sp)

    @classmethod
    def batch(cls, **values: Any) -> tuple[list["GenerateReq"], bool]:
        """SGLang's request form -> one message per prompt, and whether it was a batch.

        ``text`` is a string or a list of them, ``input_ids`` a list of ints or a list of such
        lists (exactly one of the two). Every other field is one value for all prompts or a
        list with one per prompt (``None`` entries take the default). One ``rid`` for several
        prompts becomes ``rid-0``, ``rid-1``, ...
        """
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"{unknown[0]} is not a request field (known: {names})")
        prompts, batched = _split_prompts(values.get("text"), values.get("input_ids"))
        key = "text" if values.get("text") is not None else "input_ids"
        count = len(prompts)
        per_prompt = {
            name: _per_prompt(name, values[name], count)
            for name in names
            if name not in _PROMPT_FIELDS and values.get(name) is not None
        }
        rid = values.get("rid")
        if isinstance(rid, str) and count > 1:
            per_prompt["rid"] = [f"{rid}-{i}" for i in range(count)]
        msgs = [
            cls(**{key: prompt}, **{k: v[i] for k, v in per_prompt.items() if v[i] is not None})
            for i, prompt in enumerate(prompts)
        ]
        return msgs, batched

    def tokenized(self, encode: Callable[[str], list[int]]) -> "GenerateReq":
        """This request with ``input_ids`` set (encoding ``text`` if that is what it holds)."""
        if self.input_ids is not None:
            return self
        if not isinstance(self.text, str):
            raise ValueError("text must be a string when input_ids is not given")
        return dataclasses.replace(self, text=None, input_ids=encode(self.text))

    def validate(self, limits: RequestLimits) -> None:
        """Every check of a tokenized request; ``ValueError`` names the parameter."""
        ids = self.input_ids
        if not isinstance(ids, list) or not all(_is_int(t) for t in ids):
            raise ValueError("input_ids must be a list of integers")
        if not ids:
            raise ValueError("prompt must not be empty")
        vocab = limits.vocab_size
        bad = [t for t in ids if t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            raise ValueError(f"input_ids holds token ids outside [0, {vocab}): {bad[:5]}")
        sp = self.sampling_params
        sp.validate(vocab)
        ctx = limits.context_len
        if ctx is not None and len(ids) >= ctx:
            raise ValueError(
                f"prompt has {len(ids)} tokens; the context length is {ctx} "
                "(prompts are never truncated)"
            )
        if ctx is not None and len(ids) + sp.max_new_tokens > ctx:
            raise ValueError(
                f"max_new_tokens ({sp.max_new_tokens}) plus the prompt "
                f"({len(ids)} tokens) exceeds the context length {ctx}"
            )
        if limits.max_total_tokens is not None and len(ids) + 1 > limits.max_total_tokens:
            raise ValueError(
                f"prompt has {len(ids)} tokens but the KV pool holds only "
                f"{limits.max_total_tokens} (max_total_tokens)"
            )
        if not isinstance(self.return_logprob, bool):
            raise ValueError(f"return_logprob must be a boolean, got {self.return_logprob!r}")
        if not _is_int(self.logprob_start_len) or not -1 <= self.logprob_start_len <= len(ids):
            raise ValueError(
                f"logprob_start_len must be an integer in [-1, {len(ids)}], "
                f"got {self.logprob_start_len!r}"
            )
        top = self.top_logprobs_num
        top_max = min((m for m in (vocab, limits.max_top_logprobs) if m is not None), default=None)
        if not _is_int(top) or top < 0 or (top_max is not None and top > top_max):
            raise ValueError(f"top_logprobs_num must be an integer in [0, {top_max}], got {top!r}")
        if not isinstance(self.stream, bool):
            raise ValueError(f"stream must be a boolean, got {self.stream!r}")
        if self.rid is not None and (not isinstance(self.rid, str) or not self.rid):
            raise ValueError(f"rid must be a non-empty string, got {self.rid!r}")
        if self.lora_path is not None and (
            not isinstance(self.lora_path, str) or not self.lora_path
        ):
            raise ValueError(f"lora_path must be an adapter name, got {self.lora_path!r}")

    def expand(self) -> list["GenerateReq"]:
        """One single-sample message per sample, each with a rid of its own (``rid-i`` when
        ``n > 1``; a fresh one when none was given). A fixed seed becomes ``seed + i``, so the
        samples differ but the whole request stays reproducible."""
        rid = self.rid or uuid.uuid4().hex
        sp = self.sampling_params
        if sp.n == 1:
            return [dataclasses.replace(self, rid=rid)]
        return [
            dataclasses.replace(
                self,
                rid=f"{rid}-{i}",
                sampling_params=dataclasses.replace(
                    sp, n=1, seed=None if sp.seed is None else sp.seed + i
                ),
                bootstrap=None if self.bootstrap is None else self.bootstrap.sample(i),
            )
            for i in range(sp.n)
        ]


def check_rooms(msgs: list[GenerateReq]) -> None:
    """One bootstrap room pairs one prompt's prefill and decode halves, so a batch cannot
    share one (``ValueError`` names ``bootstrap_room``)."""
    rooms = [m.bootstrap.room for m in msgs if m.bootstrap is not None]
    if len(rooms) != len(set(rooms)):
        raise ValueError(
            "bootstrap_room: one room per prompt; send a batch as separate "
            "requests with prefill/decode disaggregation"
        )


def check_sequences(msgs: list[GenerateReq], limits: RequestLimits) -> None:
    """The rule across one request's messages: its sequences (prompts x ``n``) are at most
    ``limits.max_sequences``. Needs no tokenizing, so it can run before it; ``ValueError``
    names ``n``."""
    count = sum(m.sampling_params.n for m in msgs)
    if limits.max_sequences is not None and count > limits.max_sequences:
        raise ValueError(
            f"n: the request asks for {count} sequences (prompts x n); at most "
            f"{limits.max_sequences} are allowed"
        )


@dataclass
class AbortReq:
    """Stop ``rid`` and free its KV; an unknown or finished rid is ignored."""

    rid: str


@dataclass
class FlushCacheReq:
    """Empty the prefix cache (refused while requests run). ``req_id`` matches the reply."""

    req_id: int


@dataclass
class GetInfoReq:
    """Ask for the engine's server info (limits, KV usage, counters)."""

    req_id: int


@dataclass
class LoraReq:
    """Load (``lora_path`` set) or unload a LoRA adapter named ``lora_name``."""

    req_id: int
    lora_name: str
    lora_path: str | None = None


@dataclass
class ShutdownReq:
    """Stop serving: abort what runs and exit."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and all(_is_int(t) for t in x)


def _split_prompts(text: Any, input_ids: Any) -> tuple[list[Any], bool]:
    """The prompts of a request and whether it was a batch (a list of prompts)."""
    if (text is None) == (input_ids is None):
        raise ValueError("text: exactly one of text (the prompt) and input_ids must be given")
    if text is not None:
        if isinstance(text, str):
            return [text], False
        if isinstance(text, list) and text and all(isinstance(t, str) for t in text):
            return list(text), True
        raise ValueError("text must be a string or a non-empty list of strings")
    if _is_ids(input_ids):
        return [input_ids], False
    if isinstance(input_ids, list) and all(_is_ids(ids) for ids in input_ids):
        return list(input_ids), True
    raise ValueError("input_ids must be a list of ints or a non-empty list of such lists")


def _per_prompt(name: str, value: Any, count: int) -> list[Any]:
    """A list holds one value per prompt; anything else applies to every prompt."""
    if isinstance(value, list):
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries for {count} prompts")
        return value
    return [value] * count
