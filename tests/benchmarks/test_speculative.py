"""benchmarks/speculative.py: what each workload asks for. No model loaded (the tokenizer only).

An extractive answer is as long as the passage it quotes: a cap below that cuts every quote
short, and the batch-16 run then times mostly its prefill (the ratio's ceiling was ~1.1x at
64 tokens, whatever decoding did)."""

from __future__ import annotations

from benchmarks import speculative


def test_a_quote_is_given_room_for_the_whole_passage(smollm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_dir)
    longest = max(len(tok.encode(speculative.passage(i))) for i in range(16))
    args = speculative.parse_args(["--max-new-tokens", "64"])
    for name in ("extract1", "extract16"):
        assert speculative.new_tokens(name, args) > longest  # the quote and its EOS fit
    assert speculative.new_tokens("prose1", args) == 64  # prose keeps its own length
    args = speculative.parse_args(["--quote-new-tokens", "300"])
    assert speculative.new_tokens("extract16", args) == 300
