"""Where training tensors live and in which precision: the collective backend of a device, fast-bf16
detection, the precision a config asks for, and the autocast context that runs it.

Source: docs/DESIGN.md section 5 (the stack). Used by training (bd_ray.train), the frozen teacher
(bd_ray.teacher) and the offline targets job (bd_ray.teacher_targets), so a device and a precision
mean the same thing in all three.

Mixed precision here is "compute in bf16/fp16, keep fp32 master weights and fp32 optimizer state":
models that are trained stay fp32 and run their forward under :func:`autocast`; only a frozen
teacher may be stored in a lower dtype (``models.dtype``).

Why detect bf16 at run time: bf16 matmuls are several times faster than fp32 on CPUs with AMX or
AVX512-BF16 and on CUDA GPUs with bf16, but several times *slower* on CPUs without them (AVX2-only
machines emulate bf16), so ``auto`` must never assume the machine.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Literal

import torch

__all__ = ["Precision", "as_device", "dist_backend", "fast_bf16", "resolve_precision", "autocast",
           "amp_dtype"]

Precision = Literal["fp32", "bf16", "fp16", "auto"]


def as_device(device: torch.device | str | None) -> torch.device:
    """``device`` as a ``torch.device`` (None = CPU)."""
    return torch.device("cpu") if device is None else torch.device(device)


def dist_backend(device: torch.device | str | None) -> str:
    """The torch.distributed backend for workers on ``device``: ``nccl`` on CUDA (NCCL refuses CPU
    tensors and gloo's CUDA collectives are slow), ``gloo`` on CPU. The one rule used by Ray Train's
    ``TorchConfig`` and ``deepspeed.init_distributed``."""
    return "nccl" if as_device(device).type == "cuda" else "gloo"


@functools.lru_cache(maxsize=None)
def _cpu_has_bf16_units() -> bool:
    """True when this CPU has bf16 matrix/dot instructions (AMX tiles or AVX512-BF16); torch's
    capability string says only ``AVX512``/``AVX2``, so ask torch's CPU probes, then /proc/cpuinfo."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # a probe missing on this build: fall through to cpuinfo
            pass
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return " amx_bf16" in flags or " avx512_bf16" in flags
    except OSError:
        return False


def fast_bf16(device: torch.device | str | None) -> bool:
    """Whether bf16 matmuls are fast on ``device``: a CUDA device with bf16 support, or a CPU with
    AMX / AVX512-BF16 units. False elsewhere (AVX2-only CPUs, older GPUs, other devices)."""
    d = as_device(device)
    if d.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if d.type == "cpu":
        return _cpu_has_bf16_units()
    return False


def resolve_precision(precision: str, device: torch.device | str | None, field: str = "precision") -> str:
    """``fp32`` / ``bf16`` / ``fp16`` for ``precision`` on ``device``: ``auto`` = bf16 where
    :func:`fast_bf16`, else fp32.

    Raises:
        ValueError: an unknown value, or ``fp16`` on a CPU (no fp16 matmul units, and autocast on
            CPU would run it slowly); the message names ``field``.
    """
    if precision not in ("fp32", "bf16", "fp16", "auto"):
        raise ValueError(f"{field}: must be fp32, bf16, fp16 or auto (got {precision!r})")
    if precision == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    if precision == "fp16" and as_device(device).type != "cuda":
        raise ValueError(f"{field}: fp16 needs a CUDA device (got {as_device(device)}); use bf16 or auto")
    return precision


def amp_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None for fp32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def autocast(device: torch.device | str | None, precision: str):
    """``torch.autocast`` on ``device``'s type in the resolved ``precision``; a no-op context for fp32
    (so the fp32 path runs exactly the ops it ran without this wrapper)."""
    dt = amp_dtype(precision)
    if dt is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=as_device(device).type, dtype=dt)
