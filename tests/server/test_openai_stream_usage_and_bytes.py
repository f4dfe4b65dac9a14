"""OpenAI-client features against the real server stack with ``FakeEngine`` behind it (it echoes
the prompt's tokens, one byte each): per-chunk usage (``continuous_usage_stats``) and each
logprob token's own bytes when a token is part of a UTF-8 character."""

from __future__ import annotations

import openai

from tests.server.test_server_fake import model_name

REPLACEMENT = list("\ufffd".encode())


def test_continuous_usage_stats_puts_usage_on_every_chunk(fake_server):
    client = openai.OpenAI(base_url=fake_server.url + "/v1", api_key="unused")
    chunks = list(
        client.completions.create(
            model=model_name(fake_server),
            prompt="abcd",
            max_tokens=5,
            n=2,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        )
    )
    *per_choice, final = chunks
    assert final.choices == [] and final.usage.completion_tokens == 10
    seen = {0: 0, 1: 0}
    for c in per_choice:
        (choice,) = c.choices
        u = c.usage
        assert u.prompt_tokens == 4 and u.total_tokens == u.prompt_tokens + u.completion_tokens
        assert u.completion_tokens >= seen[choice.index]  # so far: it only grows
        seen[choice.index] = u.completion_tokens
    assert seen == {0: 5, 1: 5}
    # chat too, including the role chunk; without include_usage there is no closing total
    chat = list(
        client.chat.completions.create(
            model=model_name(fake_server),
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=3,
            stream=True,
            stream_options={"continuous_usage_stats": True},
        )
    )
    assert all(c.usage is not None and c.choices for c in chat)
    assert chat[-1].usage.completion_tokens == 3 and chat[-1].usage.prompt_tokens > 2


def test_chat_logprob_bytes_are_each_tokens_own_bytes(fake_server):
    client = openai.OpenAI(base_url=fake_server.url + "/v1", api_key="unused")
    messages = [{"role": "user", "content": "你好🙂"}]
    prompt_len = client.chat.completions.create(
        model=model_name(fake_server), messages=messages, max_tokens=1
    ).usage.prompt_tokens
    for stream in (False, True):  # the echo of the whole prompt: every token one byte
        r = client.chat.completions.create(
            model=model_name(fake_server),
            messages=messages,
            max_tokens=prompt_len,
            logprobs=True,
            top_logprobs=2,
            stream=stream,
        )
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            content = [
                t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content
            ]
        else:
            text, content = r.choices[0].message.content, r.choices[0].logprobs.content
        assert "你好🙂" in text
        # special tokens are skipped in the text but are logprob tokens: compare the rest
        raw = b"".join(
            bytes(t.bytes) for t in content if t.token != "<|im_start|>" and t.token != "<|im_end|>"
        )
        assert raw.decode() == text
        entries = [t for t in content] + [x for t in content for x in t.top_logprobs]
        assert all(e.bytes != REPLACEMENT and "\ufffd" not in e.token for e in entries)
        partial = [t for t in content if t.token.startswith("bytes:")]
        assert len(partial) == len("你好🙂".encode())
        assert [b for t in partial for b in t.bytes] == list("你好🙂".encode())
