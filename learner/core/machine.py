"""What a result was measured on, recorded in every result file."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform

import torch


def resolve_device(name: str | None = None) -> torch.device:
    """``auto`` (or None) picks CUDA when there is one; an explicit name is taken as asked."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA device here")
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision setting on ``device``; None is plain fp32.

    ``auto`` is bf16 on a CUDA device that supports it, fp32 anywhere else (CPU results stay
    bit for bit what they were); ``bf16`` is bf16 on any device; ``fp32`` is fp32.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")


def precision_name(dtype: torch.dtype | None) -> str:
    """``fp32`` or ``bf16``: what a resolved precision is called in result files."""
    return "fp32" if dtype is None else {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[object]:
    """``torch.autocast`` on ``device`` with ``dtype``; a no-op context for None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe_machine(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        # The vector ISA torch dispatches CPU kernels to: results are bit-reproducible only
        # between machines that agree on it (and on torch_threads).
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_bytes"] = props.total_memory
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        info["cuda"] = torch.version.cuda
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
    return info
