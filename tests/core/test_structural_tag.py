"""The ``structural_tag`` constraint kind: xgrammar's structural tag compiled by the engine's
``GrammarCompiler`` (free text, then a tagged region held to a JSON schema), refused with a
``ValueError`` naming it when malformed, and exclusive with the other constraints."""

from __future__ import annotations

import json

import pytest
import xgrammar as xgr

from plait.core.grammar import GrammarCompiler
from plait.core.sampling_params import SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 5}},
    "required": ["n"],
}
TAG = {
    "type": "structural_tag",
    "format": {
        "type": "triggered_tags",
        "triggers": ["<call>"],
        "tags": [
            {
                "type": "tag",
                "begin": "<call>",
                "content": {"type": "json_schema", "json_schema": SCHEMA},
                "end": "</call>",
            }
        ],
    },
}


@pytest.fixture(scope="module")
def compiler():
    from transformers import AutoTokenizer

    from plait.models.default import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    return GrammarCompiler(tok, len(tok))


def _accepts(compiled, text: str) -> bool:
    m = xgr.GrammarMatcher(compiled)
    return m.accept_string(text)


def test_structural_tag_holds_only_the_tagged_region_to_its_schema(compiler):
    sp = SamplingParams.from_dict({"structural_tag": TAG})  # a dict becomes JSON text
    compiled = compiler.compile_params(sp)
    assert _accepts(compiled, 'free text <call>{"n": 3}</call> more text')
    assert not _accepts(compiled, 'free text <call>{"n": 9}</call>')  # out of bounds
    assert not _accepts(compiled, "free text <call>hello")


def test_malformed_structural_tags_are_value_errors_naming_it(compiler):
    with pytest.raises(ValueError, match="structural_tag"):
        compiler.compile("structural_tag", json.dumps({"type": "structural_tag"}))
    with pytest.raises(ValueError, match="structural_tag is not valid JSON"):
        SamplingParams.from_dict({"structural_tag": "{"}).check_grammar_syntax()


def test_structural_tag_is_exclusive_with_other_constraints():
    with pytest.raises(ValueError, match="only one of"):
        SamplingParams.from_dict({"structural_tag": TAG, "regex": "a"})
