"""How close ``--dtype bfloat16`` stays to its oracles on SmolLM2-135M (docs/cpu-backend.md,
"bfloat16"): greedy agreement with transformers in bfloat16, and perplexity on the fixed text
of ``tests/quant/test_quantized_models.py`` against float32.

- **Agreement**, teacher-forced: Plait generates ``--new`` greedy tokens for each prompt; one
  transformers forward over prompt + output gives its argmax after every prefix; the share of
  Plait's tokens equal to it (exact equality is not expected: transformers rounds every
  activation to bf16, Plait's native step keeps them in float32). (Free-running
  ``generate`` in bf16 is left out: transformers' bf16 on this CPU took minutes per prompt.)
- **Perplexity** of the text through Plait bf16, Plait float32, and transformers bf16 and
  float32 (each engine built alone, one at a time).

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.bf16_quality
"""

from __future__ import annotations

import argparse
import math

import torch

import plait
from benchmarks.quantized_ppl import perplexity
from plait.models.default import default_model_path
from tests.quant.test_quantized_models import TEXT

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "In 1969, the first humans",
    "A good way to learn a new language is",
    "The largest planet in the solar system",
]


def hf_perplexity(model, ids: list[int]) -> float:
    """exp of the mean negative log-likelihood of ``ids[1:]``, log-softmax in float32."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    nll = -torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])
    return math.exp(float(nll.mean()))


def hf_argmax_after(model, prompt: list[int], out: list[int]) -> list[int]:
    """``model``'s greedy token after each prefix ``prompt + out[:i]``."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out])).logits[0, len(prompt) - 1 : -1]
    return logits.argmax(-1).tolist()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bf16_quality")
    ap.add_argument("--new", type=int, default=32, help="greedy tokens per prompt")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM

    path = str(default_model_path())
    params = {"max_new_tokens": args.new, "temperature": 0, "ignore_eos": True}
    ppl: dict[str, float] = {}
    with plait.Engine(model_path=path, max_total_tokens=4096, dtype="bfloat16") as engine:
        prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
        ids = engine.tokenizer.encode(TEXT)
        outs = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)]
        ppl["Plait bf16"] = perplexity(engine, ids)
    with plait.Engine(model_path=path, max_total_tokens=4096, dtype="float32") as engine:
        ppl["Plait float32"] = perplexity(engine, ids)
    torch.set_num_threads(2)
    same = total = 0
    for dtype in (torch.bfloat16, torch.float32):
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        name = f"transformers {'bf16' if dtype == torch.bfloat16 else 'float32'}"
        ppl[name] = hf_perplexity(hf, ids)
        if dtype == torch.bfloat16:
            for prompt, out in zip(prompts, outs):
                want = hf_argmax_after(hf, prompt, out)
                same += sum(a == b for a, b in zip(want, out))
                total += len(out)
        del hf
    print(f"{len(prompts)} prompts x {args.new} greedy tokens; text: {len(ids)} tokens")
    print(f"teacher-forced agreement with transformers bf16: {same}/{total} = {same / total:.3f}")
    base = ppl["Plait float32"]
    print("| engine | perplexity | vs Plait float32 |\n|---|---:|---:|")
    for name, value in ppl.items():
        print(f"| {name} | {value:.3f} | {100 * (value / base - 1):+.2f} % |")


if __name__ == "__main__":
    main()
