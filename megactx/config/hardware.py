"""What this machine computes natively, and the compute dtype `auto` picks from it.

The same two cores may be AVX2, AVX512, AVX512 with BF16 dot products, or AVX512 with AMX; which dtype is
fastest differs between them, so `--dtype auto` (the default) asks the CPU. Measured on 2 cores:

    AMX                bf16  bf16 matmul 2.1 TFLOP/s vs fp32 0.29; prefill of the 0.5B evaluation model 3.4-4x faster
    AVX512-BF16        fp32  bf16 matmul 0.35 vs fp32 0.13 TFLOP/s, but prefill only 1.2-1.4x faster (16K / 4K
                             tokens) while decoding ran 2x slower (SmolLM2: 27 vs 55 tok/s; fp32 decodes with fp16
                             weights); pass --dtype bf16 for long prefills there
    AVX2 / AVX512      fp32  bf16 is emulated: a bf16 linear ran at 17 GFLOP/s against 106 in fp32

On CUDA, auto is bf16 where the GPU supports it, else fp32.
"""
from __future__ import annotations

import os
import platform

FLAG_NAMES = {"avx2": "AVX2", "avx512f": "AVX512", "avx512_bf16": "AVX512-BF16", "amx_tile": "AMX",
              "amx_bf16": "AMX-BF16"}


def cpu_flags() -> list[str]:
    """The vector-extension flags of /proc/cpuinfo that decide the speed of each dtype (Linux; else [])."""
    if platform.system() != "Linux":
        return []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in FLAG_NAMES if f in have]
    except OSError:
        pass
    return []


def cpu_summary() -> str:
    """'2 cores, AVX2 AVX512 AVX512-BF16': recorded with every benchmark figure."""
    names = " ".join(FLAG_NAMES[f] for f in cpu_flags()) or "no AVX2"
    return f"{os.cpu_count()} cores, {names}"


def cpu_has_native(dtype) -> bool:
    """Whether this CPU multiplies `dtype` matrices natively: bf16 needs AVX512-BF16 or AMX, fp16 AMX-FP16.
    Without them oneDNN and ATen convert element by element, several times slower than fp32."""
    import torch
    if dtype == torch.float32:
        return True
    cpu = torch.cpu
    if dtype == torch.bfloat16:
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    return bool(cpu._is_amx_fp16_supported())


def auto_compute_dtype(device: str):
    """-> (torch dtype, the reason, for the start-up log)."""
    import torch
    if device.startswith("cuda"):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16, "this GPU supports bf16"
        return torch.float32, "this GPU has no bf16"
    if device != "cpu":
        return torch.float32, f"device {device}"
    if torch.cpu._is_amx_tile_supported():
        return torch.bfloat16, "this CPU has AMX: bf16 matrix products run several times faster than fp32"
    if cpu_has_native(torch.bfloat16):
        return torch.float32, ("this CPU has AVX512-BF16 but no AMX: bf16 prefills only 1.2-1.4x faster and decodes "
                               "2x slower than fp32")
    return torch.float32, "this CPU has no AMX or AVX512-BF16: bf16 would be emulated, slower than fp32"


def resolve_compute_dtype(name: str, device: str):
    """-> (torch dtype, its short name fp32/bf16/fp16, the reason when `name` is auto else None)."""
    import torch

    from megactx.config.fields import parse_dtype
    chosen, reason = parse_dtype(name), None
    if chosen is None:
        chosen, reason = auto_compute_dtype(device)
    short = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[chosen]
    return chosen, short, reason
