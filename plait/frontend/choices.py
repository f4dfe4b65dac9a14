"""How ``select`` turns per-choice prompt logprobs into a decision.

Each method receives, per choice, the logprob entries ``(logprob, token_id, text)`` of the
choice's own tokens (the context is excluded). Names and semantics follow SGLang's
``sglang.lang.choices`` so ``choices_method=`` ports unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Entry = Any  # (logprob, token_id, text) as lists or tuples, as the engine reports them


@dataclass
class ChoicesDecision:
    decision: str
    meta_info: dict[str, Any] = field(default_factory=dict)


def _argmax_first(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("-inf")


def normalized_logprob(entries: list[Entry]) -> float:
    """Mean logprob over a choice's tokens; a ``None`` (no context before it) is skipped."""
    return _mean([e[0] for e in entries if e[0] is not None])


class ChoicesSamplingMethod:
    requires_unconditional_logprobs = False

    def __call__(
        self,
        *,
        choices: list[str],
        normalized_prompt_logprobs: list[float],
        input_token_logprobs: list[list[Entry]],
        unconditional_token_logprobs: list[list[Entry]] | None = None,
    ) -> ChoicesDecision:
        raise NotImplementedError

    @staticmethod
    def _meta(normalized: list[float], entries: list[list[Entry]], **extra: Any) -> dict:
        return {"normalized_prompt_logprobs": normalized, "input_token_logprobs": entries, **extra}


class TokenLengthNormalized(ChoicesSamplingMethod):
    """Highest mean logprob per token (the default)."""

    def __call__(
        self,
        *,
        choices,
        normalized_prompt_logprobs,
        input_token_logprobs,
        unconditional_token_logprobs=None,
    ):
        best = _argmax_first(normalized_prompt_logprobs)
        return ChoicesDecision(
            choices[best], self._meta(normalized_prompt_logprobs, input_token_logprobs)
        )


class GreedyTokenSelection(ChoicesSamplingMethod):
    """Compare first-token logprobs, breaking ties on later tokens; a shorter choice is padded
    with its own mean logprob so a prefix choice can still compete with a longer one."""

    def __call__(
        self,
        *,
        choices,
        normalized_prompt_logprobs,
        input_token_logprobs,
        unconditional_token_logprobs=None,
    ):
        width = max(len(e) for e in input_token_logprobs)
        matrix = []
        for entries in input_token_logprobs:
            row = [e[0] if e[0] is not None else 0.0 for e in entries]
            matrix.append(row + [_mean(row)] * (width - len(row)))
        remaining = list(range(len(choices)))
        for j in range(width):
            top = max(matrix[i][j] for i in remaining)
            remaining = [i for i in remaining if matrix[i][j] == top]
            if len(remaining) == 1:
                break
        meta = self._meta(
            normalized_prompt_logprobs, input_token_logprobs, greedy_logprob_matrix=matrix
        )
        return ChoicesDecision(choices[remaining[0]], meta)


class UnconditionalLikelihoodNormalized(ChoicesSamplingMethod):
    """Mean of (logprob in context - logprob without context) per token: discounts choices
    that are likely anywhere. The first unconditional logprob is ``None`` and counts as 0."""

    requires_unconditional_logprobs = True

    def __call__(
        self,
        *,
        choices,
        normalized_prompt_logprobs,
        input_token_logprobs,
        unconditional_token_logprobs=None,
    ):
        if unconditional_token_logprobs is None:
            raise ValueError("unconditional_token_logprobs are required for this method")
        scores = []
        for cond, uncond in zip(input_token_logprobs, unconditional_token_logprobs):
            if len(cond) != len(uncond):
                raise ValueError("conditional and unconditional logprobs differ in length")
            diffs = [(c[0] or 0.0) - (u[0] or 0.0) for c, u in zip(cond, uncond)]
            scores.append(_mean(diffs))
        meta = self._meta(
            normalized_prompt_logprobs,
            input_token_logprobs,
            unconditional_token_logprobs=unconditional_token_logprobs,
            normalized_unconditional_prompt_logprobs=scores,
        )
        return ChoicesDecision(choices[_argmax_first(scores)], meta)


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()
