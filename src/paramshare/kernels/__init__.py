"""Fused CPU kernels for steps PyTorch runs as several memory-bound ops; same maths.

The C++ source is compiled once per machine on first use (about 30 s; g++ or clang and the
ninja package) into TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions). Without a
compiler, or with PARAMSHARE_KERNELS=0, every function here runs PyTorch's own ops instead:
the same function, slower, rounding in the last bits differently.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import platform
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from filelock import FileLock
from torch import nn

_SOURCE = Path(__file__).with_name("conv_pool_relu.cpp")
_enabled = True
_fused_calls = 0


def _build_key(flags: list[str]) -> str:
    """What the build depends on: the source, the flags, and (for -march=native) the CPU, torch
    and Python. A build is reused only under the same key; a new key builds from scratch."""
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), cpu)
    blob = "|".join((_SOURCE.read_text(), " ".join(flags), torch.__version__, sys.version, platform.machine(), cpu))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _compile() -> ModuleType:
    """Import the build for this key, or build it. A finished build is imported directly rather
    than through cpp_extension.load, whose ninja up-to-date check rebuilds (~25 s) whenever
    another ninja binary (the pip package's or the system's) built it last."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)  # "No CUDA runtime is found": irrelevant to a CPU kernel
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    flags = ["-O3"] + (["-march=native"] if platform.machine().lower() in ("x86_64", "amd64") else [])
    name = f"paramshare_kernels_{_build_key(flags)}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    build = Path(root) / name
    build.mkdir(parents=True, exist_ok=True)
    built = build / f"{name}{'.pyd' if sys.platform == 'win32' else '.so'}"
    with FileLock(build / "paramshare.lock"):
        if built.is_file():
            spec = importlib.util.spec_from_file_location(name, built)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        print(f"paramshare: compiling {_SOURCE.name} (once per machine, ~30 s) in {build}", file=sys.stderr, flush=True)
        return cpp_extension.load(name=name, sources=[str(_SOURCE)], extra_cflags=flags, build_directory=str(build),
                                  verbose=False)


@functools.cache
def extension() -> ModuleType | None:
    """The compiled kernels, or None (disabled, or no working compiler: one warning says why)."""
    if os.environ.get("PARAMSHARE_KERNELS", "1") == "0":
        return None
    try:
        return _compile()
    except Exception as err:  # any failure to build means: use PyTorch's ops
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(f"paramshare: fused kernels unavailable ({reason}); using PyTorch's ops "
                      f"(same maths, slower). Set PARAMSHARE_KERNELS=0 to skip the attempt.", stacklevel=2)
        return None


@contextlib.contextmanager
def disabled():
    """PyTorch's own ops inside the block (reference runs, FLOP counting)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


class _ConvPoolReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        out, phase = extension().forward(x, weight, bias)
        ctx.save_for_backward(x, out, phase)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, out, phase = ctx.saved_tensors
        grad_weight, grad_bias = extension().backward(grad, x, out, phase)
        return None, grad_weight, grad_bias


def _fusable_layer(layer: nn.Module) -> bool:
    return (isinstance(layer, nn.Conv2d) and layer.in_channels == 1 and layer.kernel_size == (3, 3)
            and layer.padding == (1, 1) and layer.stride == (1, 1) and layer.dilation == (1, 1)
            and layer.groups == 1 and layer.bias is not None and layer.padding_mode == "zeros"
            and layer.weight.dtype == torch.float32)


def _fusable(layer: nn.Module, x: torch.Tensor) -> bool:
    return (_fusable_layer(layer) and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and x.shape[2] >= 2 and x.shape[3] >= 2 and not x.requires_grad)


def build_for(model: nn.Module) -> None:
    """Build (or import) the kernels model's forward can use, so that a first build's ~30 s
    does not land inside a timed epoch. Nothing for models that cannot use them."""
    if _enabled and any(_fusable_layer(m) for m in model.modules()):
        extension()


def conv_pool_relu(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """relu(max_pool2d(layer(x), 2)): one fused kernel (conv_pool_relu.cpp) when layer is a
    one-input-channel 3x3 Conv2d with padding 1 on the CPU and the data needs no gradient;
    PyTorch's ops otherwise. Max-pooling before the ReLU is the same function (they commute)
    with a quarter of the ReLU's work."""
    global _fused_calls
    if _enabled and _fusable(layer, x) and extension() is not None:
        _fused_calls += 1
        return _ConvPoolReLU.apply(x, layer.weight, layer.bias)
    return F.relu(F.max_pool2d(layer(x), 2))


def report() -> str:
    """For a run's tags: whether this process has run the fused kernel, and if not, why."""
    if _fused_calls:
        return "fused"
    if os.environ.get("PARAMSHARE_KERNELS", "1") == "0":
        return "off (PARAMSHARE_KERNELS=0)"
    if extension.cache_info().currsize and extension() is None:
        return "unavailable (build failed)"
    return "not used"
