"""The structured-generation layer with the real SmolLM2 tokenizer and random logits (no model
forward): whatever the logits say, masked sampling must produce text the constraint accepts."""

from __future__ import annotations

import json
import re
import threading

import pytest
import torch

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

from plait.core.grammar import (  # noqa: E402
    GrammarCompiler,
    GrammarState,
    apply_grammar_masks,
    choices_to_ebnf,
)
from plait.core.jump_forward import jump_forward_tokens  # noqa: E402
from plait.core.sampling_params import SamplingParams  # noqa: E402

VOCAB = 49152
MAX_TOKENS = 200


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tensors here are tiny; on a busy 2-core machine intra-op threads only add waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(smollm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, VOCAB)


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def sample_batch(compiled, tokenizer, seed: int) -> list[str]:
    """Rows: temperature-1 sampling, an unconstrained row, argmax. Returns the two texts."""
    gen = torch.Generator().manual_seed(seed)
    eos = tokenizer.eos_token_id
    states = [GrammarState(compiled, VOCAB, [eos]), None, GrammarState(compiled, VOCAB, [eos])]
    outputs: list[list[int]] = [[], [], []]
    for _ in range(MAX_TOKENS):
        logits = torch.randn(3, VOCAB, generator=gen)
        free_row = logits[1].clone()
        apply_grammar_masks(logits, states)
        assert torch.equal(logits[1], free_row), "an unconstrained row was touched"
        picks = {
            0: int(torch.multinomial(torch.softmax(logits[0], -1), 1, generator=gen)),
            2: int(logits[2].argmax()),
        }
        for row, token in picks.items():
            if not states[row].is_terminated():
                assert states[row].accept_token(token), f"mask allowed rejected token {token}"
                if not states[row].is_terminated():
                    outputs[row].append(token)
        if states[0].is_terminated() and states[2].is_terminated():
            return [decode(tokenizer, outputs[0]), decode(tokenizer, outputs[2])]
    pytest.fail(
        f"not terminated within {MAX_TOKENS} tokens: {decode(tokenizer, outputs[0])!r}, "
        f"{decode(tokenizer, outputs[2])!r}"
    )


REGEXES = [
    r"\d{3}-\d{4}",
    r"(yes|no|maybe)",
    r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])",
    r"[a-z]{1,8}@[a-z]{1,8}\.(com|org|net)",
    r"-?\d{1,5}(\.\d{1,3})?",
    r"#[0-9a-fA-F]{6}",
    r"([01]?\d|2[0-3]):[0-5]\d",
    r"(\d{1,3}\.){3}\d{1,3}",
    r"[A-Z][a-z]{2,6} [A-Z][a-z]{2,6}",
    r"(true|false|null)",
    r"\(\d{3}\) \d{3}-\d{4}",
    r"[A-Z]{2}\d{2}[A-Z0-9]{4,8}",
    r"(red|green|blue)(, (red|green|blue)){0,3}",
    r"https?://[a-z]{2,10}\.(com|io)(/[a-z]{1,6}){0,2}",
    r"v\d+\.\d+\.\d+",
    r"[a-z]{1,10}( [a-z]{1,10}){0,2}\.",
    r"\$\d{1,4}\.\d{2}",
    r"(Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day",
    r"\[(\d, ){0,4}\d\]",
    r"(café|naïve|日本語) ok",
]

SCHEMAS = [
    {
        "type": "object",
        "required": ["name", "age"],
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
    },
    {
        "type": "object",
        "required": ["user", "active"],
        "properties": {
            "user": {
                "type": "object",
                "required": ["id", "nick"],
                "properties": {
                    "id": {"type": "integer", "minimum": 1},
                    "nick": {"type": "string", "maxLength": 6},
                },
            },
            "active": {"type": "boolean"},
        },
    },
    {"type": "array", "items": {"enum": ["low", "mid", "high"]}, "minItems": 1, "maxItems": 4},
    {
        "type": "object",
        "required": ["t"],
        "properties": {"t": {"type": "number", "minimum": -10, "maximum": 10}},
    },
    {"enum": ["a", 1, None, True, "two words"]},
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
    {
        "type": "object",
        "required": ["code"],
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
    },
    {
        "type": "object",
        "required": ["kind", "coords"],
        "properties": {
            "kind": {"const": "point"},
            "coords": {
                "type": "array",
                "items": {"type": "number", "minimum": 0, "maximum": 1},
                "minItems": 2,
                "maxItems": 2,
            },
            "label": {"type": "string", "maxLength": 4},
        },
    },
    {
        "anyOf": [
            {"type": "integer", "minimum": 0, "maximum": 9},
            {"type": "string", "enum": ["none"]},
        ]
    },
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
                            "flags": {"type": "array", "maxItems": 4, "items": {"type": "boolean"}},
                            "day": {"type": "string", "format": "date"},
                        },
                    }
                },
            }
        },
    },
]


@pytest.mark.parametrize("regex", REGEXES)
def test_random_logits_sampling_fullmatches_regex(compiler, tokenizer, regex):
    compiled = compiler.compile("regex", regex)
    for text in sample_batch(compiled, tokenizer, seed=len(regex)):
        assert re.fullmatch(regex, text), (regex, text)


@pytest.mark.parametrize("schema", SCHEMAS, ids=[f"schema{i}" for i in range(len(SCHEMAS))])
def test_random_logits_sampling_validates_json_schema(compiler, tokenizer, schema):
    compiled = compiler.compile_params(SamplingParams.from_dict({"json_schema": schema}))
    for text in sample_batch(compiled, tokenizer, seed=len(json.dumps(schema))):
        # strict=False: xgrammar lets a raw control character (a tab) into a maxLength string.
        jsonschema.validate(json.loads(text, strict=False), schema)


def test_choices_ebnf_accepts_exactly_the_choices(compiler, tokenizer):
    choices = ['say "hi"', "back\\slash", "new\nline", "café ☕"]
    compiled = compiler.compile("choices", json.dumps(choices))
    for seed in range(4):
        for text in sample_batch(compiled, tokenizer, seed):
            assert text in choices
    assert choices_to_ebnf(["a"]) == 'root ::= "a"'


@pytest.mark.parametrize(
    "kind, spec, message",
    [
        ("regex", "[a-z", "invalid regex: .*Unclosed"),
        ("regex", "(ab", "invalid regex: .*parenthesis"),
        ("json_schema", '{"type": "object"', "json_schema is not valid JSON"),
        ("json_schema", '{"type": "nonsense"}', "json_schema is not a valid JSON schema"),
        (
            "json_schema",
            '{"type": "integer", "minimum": 5, "maximum": 1}',
            "json_schema is not supported: .*minimum",
        ),
        ("ebnf", 'root ::= "a" | ', "invalid ebnf: "),
        ("ebnf", "root ::= other", 'invalid ebnf: .*"other" is not defined'),
        ("choices", "[]", "choices must be a non-empty list"),
        ("xml", "<a/>", "grammar kind must be one of"),
    ],
)
def test_bad_constraints_raise_value_error_naming_the_problem(compiler, kind, spec, message):
    with pytest.raises(ValueError, match=message) as info:
        compiler.compile(kind, spec)
    assert "/project/cpp" not in str(info.value)


def test_compile_cache_returns_same_object_and_is_lru_bounded(tokenizer):
    compiler = GrammarCompiler(tokenizer, VOCAB, max_cache_entries=2)
    first = compiler.compile("regex", r"\d+")
    assert compiler.compile("regex", r"\d+") is first
    assert compiler.compile_params(SamplingParams(regex=r"\d+")) is first
    assert compiler.compile_params(SamplingParams()) is None
    compiler.compile("regex", "a")
    compiler.compile("regex", "b")  # evicts \d+
    assert compiler.cache_size() == 2
    assert compiler.compile("regex", r"\d+") is not first


def test_concurrent_compiles_share_one_result_per_key(tokenizer):
    compiler = GrammarCompiler(tokenizer, VOCAB)
    keys = [json.dumps(SCHEMAS[i % 3]) for i in range(9)]
    results: list[tuple[str, object]] = []
    threads = [
        threading.Thread(target=lambda k=k: results.append((k, compiler.compile("json_schema", k))))
        for k in keys
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 9
    for key, compiled in results:
        assert compiled is compiler.compile("json_schema", key)
    assert compiler.cache_size() == 3


def mask_of(state: GrammarState) -> torch.Tensor:
    logits = torch.zeros(1, VOCAB)
    apply_grammar_masks(logits, [state])
    return torch.isfinite(logits[0])


def test_reset_and_rollback_restore_the_mask(compiler, tokenizer):
    compiled = compiler.compile("json_schema", json.dumps(SCHEMAS[0]))
    ids = tokenizer.encode('{"name": "Al", "age": 4', add_special_tokens=False)
    fresh = GrammarState(compiled, VOCAB, [tokenizer.eos_token_id])
    masks = [mask_of(fresh)]
    for t in ids:
        assert fresh.accept_token(t)
        masks.append(mask_of(fresh))

    resumed = GrammarState(compiled, VOCAB, [tokenizer.eos_token_id])
    resumed.accept_token(ids[0])
    resumed.reset(ids)
    assert torch.equal(mask_of(resumed), masks[-1])

    resumed.rollback(3)
    assert resumed.num_accepted == len(ids) - 3
    assert torch.equal(mask_of(resumed), masks[-4])
    resumed.rollback(len(ids) - 3)
    assert torch.equal(mask_of(resumed), masks[0])
    with pytest.raises(ValueError, match="num_tokens"):
        resumed.rollback(1)
    with pytest.raises(ValueError, match="rejected by the grammar"):
        resumed.reset(tokenizer.encode("nope", add_special_tokens=False))


def test_eos_only_when_grammar_can_end_and_forced_after(compiler, tokenizer):
    eos = tokenizer.eos_token_id
    state = GrammarState(compiler.compile("regex", r"ab(c)?"), VOCAB, [eos])
    assert not mask_of(state)[eos]
    for t in tokenizer.encode("ab", add_special_tokens=False):
        assert state.accept_token(t)
    assert mask_of(state)[eos]  # may end, may continue with "c"
    assert state.accept_token(tokenizer.encode("c", add_special_tokens=False)[0])
    assert mask_of(state).nonzero().flatten().tolist() == [eos]  # complete: only EOS
    assert state.accept_token(eos) and state.is_terminated()
    assert mask_of(state).nonzero().flatten().tolist() == [eos]  # terminated: EOS forced
    assert not state.accept_token(5)
    state.rollback(1)
    assert not state.is_terminated()


def test_padded_logits_and_unknown_ids_are_masked(tokenizer):
    padded = VOCAB + 64  # model vocab wider than the tokenizer
    compiler = GrammarCompiler(tokenizer, padded)
    state = GrammarState(compiler.compile("regex", r"[a-z]{1,3}"), padded, [2])
    logits = torch.zeros(2, padded + 32)  # logits even wider than the model vocab
    apply_grammar_masks(logits, [state, None])
    assert torch.isinf(logits[0, VOCAB:]).all()
    assert not torch.isinf(logits[1]).any()
    with pytest.raises(ValueError, match="vocab_size"):
        GrammarState(compiler.compile("regex", "a"), VOCAB, [2])


def test_torch_native_mask_matches_cpu_kernel(compiler, tokenizer, monkeypatch):
    import plait.core.grammar as grammar

    compiled = compiler.compile("json_schema", json.dumps(SCHEMAS[5]))
    states = [GrammarState(compiled, VOCAB, [2]), None, GrammarState(compiled, VOCAB, [2])]
    states[2].accept_token(tokenizer.encode("[", add_special_tokens=False)[0])
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0))
    expected = logits.clone()
    apply_grammar_masks(expected, states)
    monkeypatch.setattr(grammar, "_mask_backend", lambda device: "torch_native")
    apply_grammar_masks(logits, states)
    assert torch.equal(logits, expected)


LONG_KEYS = {
    "type": "object",
    "required": ["customerFirstName", "customerAccountNumber", "preferredContactMethod"],
    "properties": {
        "customerFirstName": {"type": "string", "maxLength": 6},
        "customerAccountNumber": {"type": "integer", "minimum": 0},
        "preferredContactMethod": {"enum": ["email", "phone"]},
    },
}


def test_jump_forward_after_brace_gives_accepted_canonical_tokens(compiler, tokenizer):
    state = GrammarState(compiler.compile("json_schema", json.dumps(LONG_KEYS)), VOCAB, [2])
    brace = tokenizer.encode("{", add_special_tokens=False)
    assert state.accept_token(brace[0])
    forced = state.jump_forward_string()
    assert forced.startswith('"customerFirstName": "')
    assert state.forced_token() == tokenizer.encode('"', add_special_tokens=False)[0]
    tokens = jump_forward_tokens(state, tokenizer, brace)
    assert tokens and state.num_accepted == 1 + len(tokens)
    text = decode(tokenizer, tokens)
    assert text == '"customerFirstName":'  # the value's ' "' is a seam left to the model
    assert state.jump_forward_string() == forced[len(text) :]
    # '"' was the only token allowed; the rest is how the tokenizer itself splits the key.
    assert tokens[1:] == tokenizer.encode('customerFirstName":', add_special_tokens=False)


def test_jump_forward_never_merges_into_the_models_last_piece(compiler, tokenizer):
    def jump_after_cust(regex):
        state = GrammarState(compiler.compile("regex", regex), VOCAB, [2])
        cust = tokenizer.encode("cust", add_special_tokens=False)
        assert all(state.accept_token(t) for t in cust)
        assert state.forced_token() is None  # several tokens could continue
        tokens = jump_forward_tokens(state, tokenizer, cust)
        assert state.num_accepted == len(cust) + len(tokens)
        return decode(tokenizer, tokens)

    # "customer" is one word: how to split it is the model's call.
    assert jump_after_cust(r"(cust)?omer, qq[0-9]") == ""
    # A new word is safe; the last piece " qq" may still become " qq7", so it is not jumped.
    assert jump_after_cust(r"(cust)? omer, qq[0-9]") == " omer,"


def test_jump_forward_skips_unstable_seam_and_drives_generation_to_valid_json(compiler, tokenizer):
    compiled = compiler.compile("json_schema", json.dumps(LONG_KEYS))
    state = GrammarState(compiled, VOCAB, [2])
    assert jump_forward_tokens(GrammarState(compiled, VOCAB, [2]), tokenizer, []) != []
    gen = torch.Generator().manual_seed(3)
    output: list[int] = []
    jumped = 0
    while not state.is_terminated() and len(output) < MAX_TOKENS:
        forced = jump_forward_tokens(state, tokenizer, output)
        if forced:
            output += forced
            jumped += len(forced)
            continue
        logits = torch.randn(1, VOCAB, generator=gen)
        apply_grammar_masks(logits, [state])
        token = int(logits.argmax())
        assert state.accept_token(token)
        output.append(token)
    assert state.is_terminated() and jumped >= 10
    jsonschema.validate(json.loads(decode(tokenizer, output[:-1]), strict=False), LONG_KEYS)
