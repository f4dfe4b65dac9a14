"""The Ascend NPU backend: torch-npu's fused inference attention over the paged pool (its
MLA mode for DeepSeek decode) and Linear weights cast to the fractal NZ layout at load.

torch_npu is imported only once ``device="npu"`` is chosen or detection finds it installed;
a machine without it just reports the backend unavailable.
"""
