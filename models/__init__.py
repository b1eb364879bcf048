"""taildiff's numbers: long-tail construction, resampling plans, networks, losses, samplers, metrics.

Pure PyTorch/NumPy. Nothing here imports ray, so every module runs (and is tested) on a plain
CPU or a GPU box without the orchestration stack.
"""
