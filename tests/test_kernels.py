"""The fused first-layer kernel is PyTorch's conv -> ReLU -> max-pool, to float rounding."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from paramshare import kernels
from paramshare.models import build

needs_build = pytest.mark.skipif(kernels.extension() is None, reason="no C++ compiler: the kernel cannot be built")


def reference(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The reference script's order, in float64."""
    w, b = layer.weight.double(), layer.bias.double()
    return F.max_pool2d(F.relu(F.conv2d(x.double(), w, b, padding=1)), 2)


def fused_and_reference(layer: nn.Conv2d, x: torch.Tensor, upstream: torch.Tensor):
    out = kernels.conv_pool_relu(layer, x)
    (out * upstream).sum().backward()
    fused = out.detach(), layer.weight.grad.clone(), layer.bias.grad.clone()
    layer.zero_grad()
    w, b = layer.weight.detach().double().requires_grad_(), layer.bias.detach().double().requires_grad_()
    ref = F.max_pool2d(F.relu(F.conv2d(x.double(), w, b, padding=1)), 2)
    grad_w, grad_b = torch.autograd.grad((ref * upstream.double()).sum(), (w, b))
    return fused, (ref.detach(), grad_w, grad_b)


@needs_build
@pytest.mark.parametrize(("batch", "channels", "height", "width"),
                         [(64, 32, 28, 28), (5, 20, 28, 28), (3, 7, 11, 9), (1, 33, 2, 2)])
def test_output_and_gradients_match_pytorch(batch, channels, height, width):
    """Channel counts that are not a multiple of the vector width, odd sizes (the pool floors)
    and a batch that is not a multiple of the gradient's image chunk."""
    torch.manual_seed(0)
    layer = nn.Conv2d(1, channels, 3, padding=1)
    x = torch.randn(batch, 1, height, width)
    upstream = torch.randn(batch, channels, height // 2, width // 2)
    (out, grad_w, grad_b), (ref, ref_w, ref_b) = fused_and_reference(layer, x, upstream)
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_w.double(), ref_w, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_b.double(), ref_b, rtol=1e-4, atol=1e-4)
    assert (out == 0).any() and (out > 0).any()


@needs_build
def test_ties_send_the_gradient_where_max_pool_does():
    """Equal values in a window (a flat image, a bias-only conv): max_pool2d's gradient goes to
    the first of them in row-major order, and so does the kernel's."""
    torch.manual_seed(1)
    layer = nn.Conv2d(1, 16, 3, padding=1)
    with torch.no_grad():
        layer.bias.abs_()
    x = torch.zeros(4, 1, 8, 8)
    x[:, :, 2:6, 2:6] = 1.0
    upstream = torch.randn(4, 16, 4, 4)
    (out, grad_w, grad_b), (ref, ref_w, ref_b) = fused_and_reference(layer, x, upstream)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_w.double(), ref_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_b.double(), ref_b, rtol=1e-5, atol=1e-5)


@needs_build
def test_results_do_not_depend_on_the_thread_count():
    torch.manual_seed(2)
    layer = nn.Conv2d(1, 32, 3, padding=1)
    x = torch.randn(37, 1, 28, 28)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = kernels.conv_pool_relu(layer, x)
            out.square().sum().backward()
            results.append((out.detach(), layer.weight.grad.clone(), layer.bias.grad.clone()))
            layer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@needs_build
def test_pytorch_ops_when_disabled_or_when_the_input_needs_a_gradient():
    torch.manual_seed(3)
    layer = nn.Conv2d(1, 8, 3, padding=1)
    x = torch.randn(2, 1, 6, 6)
    expected = F.relu(F.max_pool2d(layer(x), 2))
    before = kernels._fused_calls
    with kernels.disabled():
        assert torch.equal(kernels.conv_pool_relu(layer, x), expected)
    x.requires_grad_()
    out = kernels.conv_pool_relu(layer, x)
    out.sum().backward()
    assert x.grad is not None and kernels._fused_calls == before
    conv2 = nn.Conv2d(8, 8, 3, padding=1)
    assert torch.equal(kernels.conv_pool_relu(conv2, expected), F.relu(F.max_pool2d(conv2(expected), 2)))
    kernels.conv_pool_relu(layer, x.detach())
    assert kernels._fused_calls == before + 1 and kernels.report() == "fused"


@needs_build
def test_convnet_uses_the_kernel_and_matches_its_pytorch_twin():
    """The whole model, fused and not: same outputs and gradients, to float rounding."""
    torch.manual_seed(4)
    model = build("conv", True, {"channels": 32, "hidden": 128})
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    before = kernels._fused_calls
    fused = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    assert kernels._fused_calls == before + 1
    with kernels.disabled():
        plain = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _load_in_subprocess(env: dict, tmp_path) -> subprocess.CompletedProcess:
    code = textwrap.dedent("""
        import torch, torch.nn.functional as F
        from torch import nn
        from paramshare import kernels
        layer, x = nn.Conv2d(1, 4, 3, padding=1), torch.randn(2, 1, 6, 6)
        assert torch.allclose(kernels.conv_pool_relu(layer, x), F.relu(F.max_pool2d(layer(x), 2)), atol=1e-6)
        print("kernel:", kernels.extension() is not None, kernels.report())
    """)
    inherited = {k: v for k, v in os.environ.items() if k != "PARAMSHARE_KERNELS"}
    return subprocess.run([sys.executable, "-c", code], env={**inherited, **env}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)


def test_without_a_compiler_one_warning_then_pytorch_ops(tmp_path):
    done = _load_in_subprocess({"CXX": str(tmp_path / "no-such-compiler"),
                                "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "kernel: False unavailable (build failed)" in done.stdout
    assert done.stderr.count("fused kernels unavailable") == 1


def test_switched_off_by_the_environment(tmp_path):
    done = _load_in_subprocess({"PARAMSHARE_KERNELS": "0", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "kernel: False off (PARAMSHARE_KERNELS=0)" in done.stdout
    assert not (tmp_path / "ext").exists() and "unavailable" not in done.stderr



@needs_build
def test_the_next_process_imports_the_build_without_rebuilding(tmp_path):
    built = Path(kernels.extension().__file__)
    before = built.stat().st_mtime_ns
    done = _load_in_subprocess({}, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "kernel: True fused" in done.stdout and "compiling" not in done.stderr
    assert built.stat().st_mtime_ns == before


def test_fit_builds_the_kernel_up_front_only_for_a_model_that_can_use_it(tmp_path):
    code = textwrap.dedent("""
        from paramshare import kernels
        from paramshare.models import build
        calls = []
        for family, tied in (("mlp", True), ("conv", False), ("recurrent", True), ("conv", True)):
            kernels.build_for(build(family, tied, {}))
            calls.append(kernels.extension.cache_info().currsize)
        print(calls)
    """)
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PARAMSHARE_KERNELS": "0"},
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[0, 0, 0, 1]"


@needs_build
def test_nan_propagates_as_through_pytorchs_ops():
    torch.manual_seed(5)
    layer = nn.Conv2d(1, 16, 3, padding=1)
    x = torch.randn(3, 1, 8, 8)
    x[0, 0, 3, 4] = float("nan")
    x[2, 0, 0, 0] = float("nan")
    out = kernels.conv_pool_relu(layer, x)
    with kernels.disabled():
        expected = kernels.conv_pool_relu(layer, x)
    assert out.isnan().sum() == expected.isnan().sum() > 0
    torch.testing.assert_close(out, expected, equal_nan=True, rtol=1e-5, atol=1e-5)
