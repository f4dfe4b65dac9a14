"""Pipeline parallelism on ``torch.distributed``: the model's decoder layers are split across
``pp_size`` rank processes (rank 0, the engine's process, holds the embedding and the first
layers; the last rank the final norm and the LM head), each with a KV pool for its own layers.
Rank 0 schedules, broadcasts each batch (the tensor-parallel machinery of ``plait.core.tp``:
its launcher, worker and batch channel), and the ranks pass hidden states along in
micro-batches. See ``docs/pipeline-parallel.md``."""
