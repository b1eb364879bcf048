"""bfloat16 autocast where it pays: `bf16: auto | true | false` resolved on the device that computes.

On a CPU without bfloat16 kernels (AVX2 only: no AVX512 / AMX) oneDNN emulates bf16 and autocast
is about 10× slower than fp32 — measured on an AVX2-only 2-core machine of this project: a `small` UNet training
step of batch 64 took 12.2 s in bf16 and 1.2 s in fp32 (2 threads, median of 4). `auto`
therefore asks torch whether oneDNN has bf16 kernels on this CPU (the same predicate torch's own
tests use) and, on CUDA, whether the GPU supports bf16 (Ampere and newer).
"""
from __future__ import annotations

import torch

BF16_SETTINGS = (True, False, "auto")


def native_bf16(device) -> bool:
    """True when `device` ("cpu", "cuda", a torch.device) runs bfloat16 at full speed."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_bf16(setting, device) -> bool:
    """A section's `bf16` setting on `device`: auto -> native_bf16(device); true / false as given."""
    if setting == "auto":
        return native_bf16(device)
    if setting in BF16_SETTINGS:
        return bool(setting)
    raise ValueError(f"bf16={setting!r}: use auto, true or false")
