"""llama-cpp-python's worker (``.peers/llamacpp``): the same Q4_1 GGUF through ``Llama``.
It has no batching: requests run one at a time, each reusing the longest prefix it shares
with the previous one (llama.cpp's own prefix reuse), so the shared-prefix workload gets it."""

from __future__ import annotations

import llama_cpp
from llama_cpp import Llama

from benchmarks.peers.workers.common import Request, Serve, main


def load(job: dict) -> Serve:
    llm = Llama(
        model_path=job["gguf"],
        n_ctx=job["max_len"],
        n_batch=512,
        n_threads=job["threads"],
        n_threads_batch=job["threads"],
        seed=job["seed"],
        verbose=False,
    )

    def one(prompt: list[int], n: int) -> list[int]:
        out: list[int] = []
        # generate() yields forever (EOS included); stopping at n is ignore_eos.
        for tok in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            out.append(tok)
            if len(out) == n:
                break
        return out

    def generate(reqs: list[Request]) -> list[list[int]]:
        return [one(p, n) for p, n in reqs]

    return Serve(
        "llama.cpp",
        llama_cpp.__version__,
        generate,
        llm.reset,
        notes="Q4_1 GGUF; no batching: one request at a time",
    )


if __name__ == "__main__":
    main(load)
