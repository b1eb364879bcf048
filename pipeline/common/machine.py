"""Where a number was computed: the code's commit and the machine (CPU model and vector ISA, cores,
GPU), recorded next to timings so a wall time always says what it was measured on."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def git_commit() -> str | None:
    """HEAD of the checkout this code runs from (None outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=REPO).stdout.strip() or None
    except OSError:
        return None


def cpu_name(cpuinfo: str | None = None) -> str:
    """'<model name> (<ISA>)', ISA the widest of AMX / AVX-512 / AVX2 (what decides bf16 and fp32 speed here)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "unknown"
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), None)
    if model is None:
        return "unknown"
    flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines() if ln.startswith("flags")), [])
    isa = "AMX" if "amx_bf16" in flags else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "pre-AVX2"
    return f"{model} ({isa})"


def machine() -> dict:
    """{'cpu', 'cores', 'gpu'}: the driver's machine (the study's workers run on it in a local run)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001 - a broken CUDA install must not stop the record
        gpu = None
    return {"cpu": cpu_name(), "cores": cores, "gpu": gpu}


def describe(m: dict | None) -> str:
    """'AMD EPYC (AVX2), 2 cores' (+ ', GPU: …') for a record written by machine()."""
    if not m:
        return "an unrecorded machine"
    text = f"{m.get('cpu', 'unknown CPU')}, {m.get('cores', '?')} cores"
    return text + (f", GPU: {m['gpu']}" if m.get("gpu") else "")
