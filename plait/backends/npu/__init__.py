"""The Ascend NPU backend: torch-npu's fused inference attention over the paged pool.

torch_npu is imported only once ``device="npu"`` is chosen or detection finds it installed;
a machine without it just reports the backend unavailable.
"""
