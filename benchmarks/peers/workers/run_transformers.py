"""transformers' worker (the repository's venv: transformers is a Plait dependency): ``generate``
on one static batch per workload. Prompts are left-padded to the longest; the batch runs for
its largest ``max_new_tokens`` (``min_new_tokens`` equal, so EOS never stops it) and each
request keeps only the tokens it asked for: a static batcher's cost on mixed lengths."""

from __future__ import annotations

import torch
import transformers
from transformers import AutoModelForCausalLM

from benchmarks.peers.workers.common import Request, Serve, main

PAD = 0  # masked out; the prompts' random ids never use it


def load(job: dict) -> Serve:
    torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32).eval()

    @torch.inference_mode()
    def generate(reqs: list[Request]) -> list[list[int]]:
        width = max(len(p) for p, _ in reqs)
        ids = torch.tensor([[PAD] * (width - len(p)) + p for p, _ in reqs])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in reqs])
        new = max(n for _, n in reqs)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=PAD,
        )
        return [out[i, width : width + n].tolist() for i, (_, n) in enumerate(reqs)]

    return Serve(
        "transformers",
        transformers.__version__,
        generate,
        lambda: None,
        notes="one static batch per workload",
    )


if __name__ == "__main__":
    main(load)
