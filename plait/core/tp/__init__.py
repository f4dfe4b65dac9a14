"""Tensor parallelism on ``torch.distributed``: rank 0 (the engine's process) runs the
scheduler and broadcasts each forward batch to ranks 1..N-1 (worker processes), which run the
same forward on their shard of the model. See ``docs/tensor-parallel.md``."""
