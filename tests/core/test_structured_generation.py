"""Structured generation end to end with the real SmolLM2: what the model writes under a regex or
JSON-schema constraint always matches it, in mixed batches, at any temperature, through
jump-forward and retraction; unconstrained neighbours are untouched; bad grammars are refused
at submission. (``test_grammar.py`` covers the same layer with random logits, no model.)"""

from __future__ import annotations

import json
import re
import threading

import pytest

import plait

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

pytestmark = pytest.mark.slow

# (regex, what to ask for). Worst case every character is one token: all fit in 23 tokens, so
# max_new_tokens=24 always leaves room for the end-of-sequence token.
REGEXES = [
    (r"\d{3}-\d{4}", "a local phone number like 555-0199"),
    (r"(yes|no|maybe)", "whether cats can swim: yes, no or maybe"),
    (r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])", "today's date as YYYY-MM-DD"),
    (r"[a-z]{1,8}@[a-z]{1,6}\.(com|org|net)", "an email address for a person named Bob"),
    (r"-?\d{1,5}(\.\d{1,2})?", "the temperature in Oslo in winter, a number"),
    (r"#[0-9a-fA-F]{6}", "the hex colour code of orange"),
    (r"([01]\d|2[0-3]):[0-5]\d", "a time for lunch in 24-hour HH:MM"),
    (r"(\d{1,3}\.){3}\d{1,3}", "the IP address of a home router"),
    (r"[A-Z][a-z]{1,7} [A-Z][a-z]{1,7}", "a first and last name for a pirate"),
    (r"(true|false)", "whether the sky is green: true or false"),
    (r"\(\d{3}\) \d{3}-\d{4}", "a US phone number like (555) 123-4567"),
    (r"(red|green|blue)(, (red|green|blue)){0,2}", "the colours of a traffic light"),
    (r"v\d{1,2}\.\d{1,2}\.\d{1,2}", "a software version like v1.2.3"),
    (r"\$\d{1,4}\.\d{2}", "the price of a sandwich in dollars"),
    (r"(Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day", "the day after Friday"),
    (r"\[(\d, ){0,3}\d\]", "a short list of digits in brackets"),
    (r"[A-Z]{3}-\d{3}", "a flight number like ABC-123"),
    (r"(Mr|Ms|Dr)\. [A-Z][a-z]{2,8}", "the name of a doctor with a title"),
    (r"\d{1,2}/\d{1,2}/\d{4}", "a birthday as MM/DD/YYYY"),
    (r"[a-z]{3,10}", "one lowercase word for a fruit"),
]

# (schema, what to ask for). Every string is length-bounded and every number bounded, so at
# temperature 1 a complete document fits in 96 tokens.
SCHEMAS = [
    (
        {
            "type": "object",
            "required": ["name", "age"],
            "properties": {
                "name": {"type": "string", "maxLength": 10},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
            },
        },
        "a person with a name and an age",
    ),
    (
        {
            "type": "object",
            "required": ["user", "active"],
            "properties": {
                "user": {
                    "type": "object",
                    "required": ["id", "nick"],
                    "properties": {
                        "id": {"type": "integer", "minimum": 1, "maximum": 9999},
                        "nick": {"type": "string", "maxLength": 8},
                    },
                },
                "active": {"type": "boolean"},
            },
        },
        "a user account with an id, a nickname and whether it is active",
    ),
    (
        {"type": "array", "items": {"enum": ["low", "mid", "high"]}, "minItems": 1, "maxItems": 4},
        "a list of priority levels",
    ),
    (
        {
            "type": "object",
            "required": ["temperature", "humidity"],
            "properties": {
                "temperature": {"type": "number", "minimum": -50, "maximum": 60},
                "humidity": {"type": "integer", "minimum": 0, "maximum": 100},
            },
        },
        "today's weather: temperature in Celsius and humidity in percent",
    ),
    (
        {
            "type": "object",
            "required": ["language", "tags"],
            "properties": {
                "language": {"enum": ["python", "go", "rust", "java"]},
                "tags": {
                    "type": "array",
                    "maxItems": 3,
                    "items": {"type": "string", "maxLength": 6},
                },
            },
        },
        "a programming language and some tags describing it",
    ),
    (
        {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "required": ["x", "y"],
                "properties": {
                    "x": {"type": "integer", "minimum": -5, "maximum": 5},
                    "y": {"type": "integer", "minimum": 0, "maximum": 99},
                },
            },
        },
        "a few points with x and y coordinates",
    ),
    (
        {
            "type": "object",
            "required": ["code", "priority"],
            "properties": {
                "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                "priority": {"enum": [1, 2, 3]},
            },
        },
        "a ticket with a code like ABC-12 and a priority from 1 to 3",
    ),
    (
        {
            "type": "object",
            "required": ["kind", "coords"],
            "properties": {
                "kind": {"const": "point"},
                "coords": {
                    "type": "array",
                    "minItems": 2,
                    "maxItems": 2,
                    "items": {"type": "number", "minimum": 0, "maximum": 1},
                },
                "label": {"type": "string", "maxLength": 4},
            },
        },
        "a point in the unit square",
    ),
    (
        {
            "type": "object",
            "required": ["a"],
            "properties": {
                "a": {
                    "type": "object",
                    "required": ["b"],
                    "properties": {
                        "b": {
                            "type": "object",
                            "required": ["flags", "day"],
                            "properties": {
                                "flags": {
                                    "type": "array",
                                    "maxItems": 3,
                                    "items": {"type": "boolean"},
                                },
                                "day": {"type": "string", "format": "date"},
                            },
                        }
                    },
                }
            },
        },
        "some flags and a date, nested",
    ),
    (
        {
            "type": "object",
            "required": ["orderId", "items", "status"],
            "properties": {
                "orderId": {"type": "integer", "minimum": 1, "maximum": 99999},
                "items": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 2,
                    "items": {
                        "type": "object",
                        "required": ["sku", "qty"],
                        "properties": {
                            "sku": {"type": "string", "maxLength": 6},
                            "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                        },
                    },
                },
                "status": {"enum": ["new", "paid", "shipped"]},
            },
        },
        "an online order with an id, items and a status",
    ),
]

FREE_PROMPTS = [
    "What is the capital of France?",
    "Name three colours.",
    "Write a haiku about rain.",
    "How many legs does a spider have?",
    "Say hello in Spanish.",
    "What is 2 + 2?",
]
REGEX_TOKENS, JSON_TOKENS, FREE_TOKENS = 24, 96, 24


@pytest.fixture(scope="module")
def engine(smollm_dir):
    with plait.Engine(smollm_dir) as eng:
        yield eng


def chat(engine, question: str) -> str:
    return engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def regex_request(engine, i: int, temperature: float) -> tuple[str, dict]:
    regex, ask = REGEXES[i]
    return (
        chat(engine, f"Reply with only {ask}."),
        {"regex": regex, "temperature": temperature, "seed": i, "max_new_tokens": REGEX_TOKENS},
    )


def json_request(engine, i: int, temperature: float) -> tuple[str, dict]:
    schema, ask = SCHEMAS[i]
    return (
        chat(engine, f"Reply with only JSON describing {ask}."),
        {
            "json_schema": schema,
            "temperature": temperature,
            "seed": i,
            "max_new_tokens": JSON_TOKENS,
        },
    )


def free_request(engine, i: int) -> tuple[str, dict]:
    # the last two sample at temperature 1 with a seed: their draws must not move either
    temperature = 0 if i < 4 else 1.0
    return (
        chat(engine, FREE_PROMPTS[i]),
        {"temperature": temperature, "seed": 100 + i, "max_new_tokens": FREE_TOKENS},
    )


def assert_valid_json(text: str, schema: dict) -> None:
    # strict=False: xgrammar's maxLength strings admit raw control characters (e.g. a tab)
    jsonschema.validate(json.loads(text, strict=False), schema)


@pytest.fixture(scope="module")
def mixed_batch(engine):
    """Every constrained request at temperature 0 and 1, plus unconstrained ones, all submitted
    in ONE generate call so that they share batches. Returns {(kind, i, temp): output}."""
    keys, prompts, params = [], [], []
    for temperature in (0, 1.0):
        for i in range(len(REGEXES)):
            keys.append(("regex", i, temperature))
            p, sp = regex_request(engine, i, temperature)
            prompts.append(p)
            params.append(sp)
        for i in range(len(SCHEMAS)):
            keys.append(("json", i, temperature))
            p, sp = json_request(engine, i, temperature)
            prompts.append(p)
            params.append(sp)
    for i in range(len(FREE_PROMPTS)):
        keys.append(("free", i, None))
        p, sp = free_request(engine, i)
        prompts.append(p)
        params.append(sp)
    # interleave so that constrained and unconstrained rows sit next to each other
    order = sorted(range(len(keys)), key=lambda k: (k * 7) % len(keys))
    outs = engine.generate(
        prompt=[prompts[k] for k in order], sampling_params=[params[k] for k in order]
    )
    return {keys[k]: out for k, out in zip(order, outs)}


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_regex_outputs_fullmatch_in_a_mixed_batch(mixed_batch, temperature):
    for i, (regex, _) in enumerate(REGEXES):
        out = mixed_batch[("regex", i, temperature)]
        assert re.fullmatch(regex, out["text"]), (regex, out["text"], out["meta_info"])


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_json_outputs_validate_in_a_mixed_batch(mixed_batch, temperature):
    for i, (schema, _) in enumerate(SCHEMAS):
        out = mixed_batch[("json", i, temperature)]
        assert out["meta_info"]["finish_reason"]["type"] == "stop", (i, out["text"])
        assert_valid_json(out["text"], schema)


def test_unconstrained_requests_in_a_mixed_batch_match_solo_runs(engine, mixed_batch):
    for i in range(len(FREE_PROMPTS)):
        prompt, sp = free_request(engine, i)
        solo = engine.generate(prompt=prompt, sampling_params=sp)
        assert mixed_batch[("free", i, None)]["output_ids"] == solo["output_ids"], FREE_PROMPTS[i]


def test_constrained_greedy_output_in_a_batch_matches_solo_run(engine, mixed_batch):
    for kind, i, make in (("regex", 2, regex_request), ("json", 4, json_request)):
        prompt, sp = make(engine, i, 0)
        solo = engine.generate(prompt=prompt, sampling_params=sp)
        assert mixed_batch[(kind, i, 0)]["output_ids"] == solo["output_ids"], (kind, i)


# Long fixed keys, spelled out in the prompt: the model expects them, so its own greedy tokens
# for the forced text are the tokenizer's canonical ones, the case in which jump-forward
# promises identical output (see plait/core/jump_forward.py for why it cannot promise more).
LONG_KEYS = {
    "type": "object",
    "required": [
        "customerFirstName",
        "customerLastName",
        "preferredContactMethod",
        "customerAccountIsActive",
    ],
    "properties": {
        "customerFirstName": {"type": "string", "maxLength": 12},
        "customerLastName": {"type": "string", "maxLength": 12},
        "preferredContactMethod": {"enum": ["email", "phone", "mail"]},
        "customerAccountIsActive": {"type": "boolean"},
    },
}
CUSTOMERS = [
    "Jane Doe, who prefers email and has an active account",
    "Carlos Rivera, who prefers phone calls and has closed his account",
]


def run_alone(engine, prompt: str, sp: dict, jump_forward: bool) -> tuple[dict, int]:
    """One request with nothing else running; returns (output, forward passes it took)."""
    engine.scheduler.config.enable_jump_forward = jump_forward
    try:
        assert engine.flush_cache()  # both runs compute the prompt the same way
        before = engine.get_server_info()["forward_passes"]
        out = engine.generate(prompt=prompt, sampling_params=sp)
        return out, engine.get_server_info()["forward_passes"] - before
    finally:
        engine.scheduler.config.enable_jump_forward = True


@pytest.mark.parametrize("customer", CUSTOMERS)
def test_jump_forward_saves_forward_passes_with_identical_greedy_output(engine, customer):
    template = json.dumps({k: "..." for k in LONG_KEYS["required"]})
    prompt = chat(engine, f"Reply with only JSON in the form {template} for {customer}.")
    sp = {"json_schema": LONG_KEYS, "temperature": 0, "max_new_tokens": JSON_TOKENS}
    jumped, passes = run_alone(engine, prompt, sp, jump_forward=True)
    plain, plain_passes = run_alone(engine, prompt, sp, jump_forward=False)
    assert_valid_json(jumped["text"], LONG_KEYS)
    assert jumped["output_ids"] == plain["output_ids"]
    tokens = jumped["meta_info"]["completion_tokens"]
    # one prefill, then one decode per further token; with the overlap schedule one more:
    # the decode launched before the stopping token was processed, whose token is dropped
    assert plain_passes == tokens + engine.scheduler.executor.overlap
    assert passes / tokens < 0.7, (passes, tokens)


def test_jump_forward_output_stays_valid_where_the_model_would_split_keys_oddly(engine):
    """Unprompted keys: plain decoding lets the model spell "customerFirstName" in odd pieces
    that jump-forward, which takes the canonical tokens, does not reproduce. The outputs may
    then differ (documented in jump_forward.py); both must be valid."""
    prompt = chat(engine, "Describe a customer.")
    sp = {"json_schema": LONG_KEYS, "temperature": 0, "max_new_tokens": JSON_TOKENS}
    for jump_forward in (True, False):
        out, _ = run_alone(engine, prompt, sp, jump_forward)
        assert_valid_json(out["text"], LONG_KEYS)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"regex": "[a-z"}, "invalid regex: .*Unclosed"),
        ({"regex": "(ab"}, "invalid regex: .*parenthesis"),
        ({"json_schema": '{"type": "object"'}, "json_schema is not valid JSON"),
        ({"json_schema": {"type": "nonsense"}}, "json_schema is not a valid JSON schema"),
        (
            {"json_schema": '{"type": "integer", "minimum": 5, "maximum": 1}'},
            "json_schema is not supported: .*minimum",
        ),
        ({"ebnf": "root ::= other"}, 'invalid ebnf: .*"other" is not defined'),
        ({"regex": r"\d+", "json_schema": {"type": "integer"}}, "only one of regex, json_schema"),
    ],
)
def test_invalid_grammar_is_rejected_at_submission_and_engine_keeps_serving(
    engine, params, message
):
    good_prompt, good = regex_request(engine, 0, 0)
    with pytest.raises(ValueError, match=message):
        # the bad request sits beside a good one: neither may reach the scheduler
        engine.generate(
            prompt=[good_prompt, chat(engine, "Anything.")],
            sampling_params=[good, {"max_new_tokens": 4, **params}],
        )
    info = engine.get_server_info()
    assert info["num_waiting_reqs"] == info["num_running_reqs"] == 0
    out = engine.generate(prompt=good_prompt, sampling_params=good)
    assert re.fullmatch(REGEXES[0][0], out["text"])


def test_constrained_requests_survive_retraction_with_unchanged_output(
    smollm_dir, engine, mixed_batch
):
    """A KV pool too small for the batch forces retraction mid-generation. Output tokens are
    kept on retraction, so the grammar state stays valid with no reset: output (greedy, and
    seeded sampling) equals what the roomy engine produced in the mixed batch."""
    keys = (
        [("json", i, 0) for i in (0, 1, 3, 9)]
        + [("regex", i, 0) for i in (2, 8)]
        + [("json", i, 1.0) for i in (1, 9)]
    )
    requests = [
        (regex_request if kind == "regex" else json_request)(engine, i, t) for kind, i, t in keys
    ]
    with plait.Engine(smollm_dir, max_total_tokens=160) as tight:
        # admit greedily so that decode runs out of KV and has to retract
        tight.scheduler.new_token_ratio = tight.scheduler.config.min_new_token_ratio = 0.0
        outs = tight.generate(
            prompt=[p for p, _ in requests], sampling_params=[sp for _, sp in requests]
        )
        assert tight.get_server_info()["retractions"] > 0
    assert [o["output_ids"] for o in outs] == [mixed_batch[k]["output_ids"] for k in keys]
    for out, (_, sp) in zip(outs, requests):
        if "regex" in sp:
            assert re.fullmatch(sp["regex"], out["text"]), out["text"]
        else:
            assert_valid_json(out["text"], sp["json_schema"])


def test_jump_forward_requests_waiting_for_kv_do_not_hang_a_tiny_pool(smollm_dir, engine):
    """Jump-forward parks a request, with its KV, until its forced tokens are extended. In a
    tiny pool several parked requests can each wait for the others' KV while nothing runs; the
    scheduler must retract them (this hung the engine before) and still give the same output."""
    template = json.dumps({k: "..." for k in LONG_KEYS["required"]})
    prompts = [
        chat(engine, f"Reply with only JSON in the form {template} for {name}.")
        for name in (
            "Jane Doe",
            "Carlos Rivera",
            "Mia Wong",
            "Tom Berg",
            "Ana Lima",
            "Raj Patel",
            "Eve Stone",
            "Ola Nord",
        )
    ]
    sp = {"json_schema": LONG_KEYS, "temperature": 0, "max_new_tokens": JSON_TOKENS}
    want = engine.generate(prompt=prompts, sampling_params=sp)
    with plait.Engine(smollm_dir, max_total_tokens=160) as tight:
        tight.scheduler.new_token_ratio = tight.scheduler.config.min_new_token_ratio = 0.0
        done: list = []
        worker = threading.Thread(
            target=lambda: done.append(tight.generate(prompt=prompts, sampling_params=sp)),
            daemon=True,
        )
        worker.start()
        worker.join(timeout=300)
        assert done, "the engine hung with jump-forward requests waiting for KV"
        assert tight.get_server_info()["retractions"] > 0
    assert [o["output_ids"] for o in done[0]] == [o["output_ids"] for o in want]
    for out in done[0]:
        assert_valid_json(out["text"], LONG_KEYS)
