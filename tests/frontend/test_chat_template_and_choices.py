"""Role markers derived from a real Jinja template, and the choice-selection methods."""

from __future__ import annotations

import math

import pytest

from plait.frontend.chat_template import ChatTemplate, load_tokenizer
from plait.frontend.choices import (
    greedy_token_selection,
    token_length_normalized,
    unconditional_likelihood_normalized,
)


@pytest.fixture(scope="module")
def smollm_template(smollm_dir):
    return ChatTemplate.from_tokenizer(load_tokenizer(str(smollm_dir)))


def _stream(template, messages):
    """Render a conversation the way the interpreter does: prefix, content, suffix."""
    text, history = "", []
    for m in messages:
        prefix, suffix = template.prefix_and_suffix(m["role"], history)
        text += prefix + m["content"] + suffix
        history.append(m)
    return text


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ],
    ],
)
def test_streamed_roles_equal_apply_chat_template(smollm_dir, smollm_template, messages):
    tok = load_tokenizer(str(smollm_dir))
    expected = tok.apply_chat_template(messages, tokenize=False)
    assert _stream(smollm_template, messages) == expected


def test_default_system_prompt_lands_in_first_prefix(smollm_template):
    prefix, suffix = smollm_template.prefix_and_suffix("user", [])
    assert prefix.startswith("<|im_start|>system\nYou are a helpful AI assistant")
    assert prefix.endswith("<|im_start|>user\n") and suffix == "<|im_end|>\n"


def test_non_append_only_template_warns_and_keeps_new_part():
    # the system prompt is folded into the first user turn once one exists
    def render(messages):
        sys_ = "".join(m["content"] for m in messages if m["role"] == "system")
        out = ""
        for m in messages:
            if m["role"] == "user":
                out += f"[INST] {sys_}{m['content']} [/INST]"
            elif m["role"] == "assistant":
                out += f" {m['content']}</s>"
        return out or f"<<{sys_}>>"

    template = ChatTemplate(render)
    with pytest.warns(UserWarning, match="append-only"):
        prefix, suffix = template.prefix_and_suffix("user", [{"role": "system"}])
    assert suffix == " [/INST]"


SCORES = [[-0.1], [-0.1, -0.3], [-0.4, -0.25, -0.1]]  # "organ", "organism", "antidis..."


def _entries(rows):
    return [[[lp, i, None] for i, lp in enumerate(row)] for row in rows]


def _call(method, **extra):
    choices = ["organ", "organism", "antidisestablishmentarianism"]
    normalized = [sum(r) / len(r) for r in SCORES]
    return method(
        choices=choices,
        normalized_prompt_logprobs=normalized,
        input_token_logprobs=_entries(SCORES),
        **extra,
    )


def test_token_length_normalized_picks_best_mean():
    d = _call(token_length_normalized)
    assert d.decision == "organ"
    assert d.meta_info["normalized_prompt_logprobs"][0] == pytest.approx(-0.1)


def test_greedy_token_selection_breaks_ties_on_later_tokens():
    d = _call(greedy_token_selection)
    assert d.decision == "organ"  # ties "organism" on token 0, wins with its mean -0.1 > -0.3
    assert d.meta_info["greedy_logprob_matrix"][0] == [-0.1, -0.1, -0.1]


def test_unconditional_likelihood_normalized_discounts_common_choices():
    uncond = _entries([[None], [None, -0.1], [None, -0.1, -0.05]])
    d = _call(unconditional_likelihood_normalized, unconditional_token_logprobs=uncond)
    scores = d.meta_info["normalized_unconditional_prompt_logprobs"]
    assert scores == pytest.approx([-0.1, -0.15, (-0.4 - 0.15 - 0.05) / 3])
    assert d.decision == "organ"
    with pytest.raises(ValueError, match="unconditional"):
        _call(unconditional_likelihood_normalized)
    assert not math.isnan(scores[0])
