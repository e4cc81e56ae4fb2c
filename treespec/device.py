"""Where a model runs: the device, the weights' dtype and the kernel set, resolved once at load time.

`auto` picks CUDA when torch sees one; dtype `auto` is bfloat16 on CUDA and float32 on CPU; kernels `auto` are the
CPU fast paths (models/device_kernels.py) exactly when the model runs fp32 on the CPU, else the portable ones.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

import torch

from treespec.errors import ConfigError

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


class DType(Enum):
    AUTO = "auto"          # bfloat16 on CUDA, float32 on CPU
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class Kernels(Enum):
    """Which products a model runs (the seam in models/device_kernels.py)."""
    AUTO = "auto"          # CPU when the model runs fp32 on the CPU, else PORTABLE
    CPU = "cpu"            # oneDNN-packed weights, the fbgemm fp16 head screen, C++ block kernels: fp32 CPU only
    PORTABLE = "portable"  # plain torch ops (matmul, SDPA with the tree mask, a plain head): what CUDA runs


def check_device(spec: str) -> str:
    """`spec` if it names a device form treespec takes (cpu, cuda, cuda:N, auto); ConfigError otherwise."""
    if not isinstance(spec, str) or not _DEVICE.fullmatch(spec):
        raise ConfigError(f"device: {spec!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N'")
    return spec


def resolve_device(spec: str) -> torch.device:
    """The torch device for `spec`; a one-line ConfigError when it names a GPU this machine does not have."""
    check_device(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {spec!r} asked for, but torch sees no CUDA device here "
                              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device: {spec!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def resolve_dtype(dtype: DType, device: torch.device) -> torch.dtype:
    if dtype is DType.AUTO:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype.value)


@dataclass(frozen=True)
class Placement:
    """The resolved device, dtype and kernel set of one loaded model."""
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    kernels: Kernels = Kernels.CPU

    @classmethod
    def resolve(cls, device: str = "auto", dtype: DType = DType.AUTO, kernels: Kernels = Kernels.AUTO) -> "Placement":
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        cpu_fp32 = dev.type == "cpu" and dt == torch.float32
        if kernels is Kernels.AUTO:
            kernels = Kernels.CPU if cpu_fp32 else Kernels.PORTABLE
        elif kernels is Kernels.CPU and not cpu_fp32:
            raise ConfigError(f"kernels: 'cpu' runs float32 on the CPU only (got {dt} on {dev}); use 'portable' or 'auto'")
        return cls(dev, dt, kernels)

    @property
    def cpu_fp32(self) -> bool:
        return self.device.type == "cpu" and self.dtype == torch.float32

    def describe(self) -> str:
        return f"{self.device} {str(self.dtype).removeprefix('torch.')} {self.kernels.value} kernels"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timers around CUDA work need it; a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
