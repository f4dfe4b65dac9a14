"""Multi-LoRA serving (docs/lora.md): PEFT adapters in a pool of device slots, applied per
request inside one batch. ``adapter`` reads and checks an adapter, ``pool`` holds the slots,
``ops`` (torch) and ``triton_ops`` (CUDA/ROCm) compute the batched products, ``layers`` wraps
the model's projections and ``manager`` ties them to the engine."""
