"""What the machine decides for a training run: CPUs, device, precision (and the fp32 input layer under
bf16), step kind, subnormal flushing."""

from __future__ import annotations

import contextlib
import os
import sys

import torch

from pipeline.training.config import TrainConfigError


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, narrowed to Ray's CPU assignment inside a Ray worker."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        try:
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        except Exception:  # noqa: BLE001 - driver process or older Ray: keep the affinity count
            cpus = None
        if cpus:
            n = min(n, max(1, int(cpus)))
    return max(1, n)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainConfigError("device='cuda' but torch sees no CUDA GPU; use device='auto' or 'cpu'")
    return torch.device(device)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively (GPU bf16, or a CPU with AVX512-BF16 / AMX via oneDNN)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """ "auto" -> bf16 on a CPU with native bf16 (faster at equal held-out MSE), fp32 on CUDA.

    On a GPU these small models are bound by kernel launches, not by arithmetic, and autocast only adds
    cast kernels, so bf16 is slower there (README "Speed"; bench/train_throughput.py --device cuda)."""
    if precision == "auto":
        return "bf16" if device.type == "cpu" and native_bf16(device) else "fp32"
    return precision


def resolve_step(step: str, device: torch.device) -> str:
    """ "auto" -> "graph" on CUDA (one launch per step instead of ~100), "eager" on a CPU (fastest there)."""
    if step == "auto":
        return "graph" if device.type == "cuda" else "eager"
    return step


@contextlib.contextmanager
def flush_denormals(device):
    """Treat subnormal floats as zero on the CPU while training (x86 FTZ/DAZ), then go back to the default.

    Real IDM data drives some activations and Adam's second moments into the subnormal range (< 1.2e-38),
    where x86 arithmetic is many times slower (README "Speed"; bench/train_throughput.py). Values that
    small do not change any weight update, and the held-out MSE is the same either way
    (tests/pipeline/training/test_trainer.py).
    """
    if device.type != "cpu" or not torch.set_flush_denormal(True):  # False: this CPU cannot
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)  # PyTorch's default (it has no getter for the previous state)


@contextlib.contextmanager
def fp32_input_layer(net, device_type: str, enabled: bool):
    """Run the first Linear (the one that sees the normalized s and s') outside autocast, in fp32.

    An IDM reads the small difference s' - s out of two inputs of order 1; rounding them to bf16 (8
    significant bits) loses much of that difference. The first layer is a small share of the FLOPs (its
    input is narrow), so keeping it fp32 costs little; every later layer sees features, where bf16
    rounding is harmless.
    """
    first = next((m for m in net.modules() if isinstance(m, torch.nn.Linear)), None)
    if not enabled or first is None:
        yield
        return
    saved = []

    def before(module, args):
        saved.append(torch.is_autocast_enabled(device_type))
        torch.set_autocast_enabled(device_type, False)

    def after(module, args, output):
        torch.set_autocast_enabled(device_type, saved.pop())

    handles = [first.register_forward_pre_hook(before), first.register_forward_hook(after)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
