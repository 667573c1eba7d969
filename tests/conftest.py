"""Test set-up shared by every test file.

Without a GPU the Triton kernels run under the interpreter on the CPU; TRITON_INTERPRET must be set
before triton is first imported, which is why it happens here, before any test module loads.
With a GPU the same tests run on CUDA, with bfloat16 and larger shapes added (the GPU suite).
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

# Interpreter limit: tl.dot on bfloat16 operands is wrong under TRITON_INTERPRET (triton issue
# 11584), so bfloat16 runs only on the GPU.
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])

# Relative error ||out - ref|| / ||ref|| against a float64 reference computed from the same
# (rounded) inputs. float32: exact products (tf32 off), error from summation order only.
# float16 / bfloat16: outputs and the S' intermediate are rounded to the dtype (2^-11 / 2^-8 unit
# roundoff), plus float32 accumulation.
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}

# float32 intermediates (S, U, reductions over T) computed from dtype-rounded inputs. float32
# inputs: summation order only. 16-bit inputs on a GPU: the tensor cores add the products into a
# float32 accumulator with truncated alignment, which over K = 14336 terms reaches ~1e-5..1e-4.
ACC_TOL = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 2e-4}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite values (unwritten output or overflow)"
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


@pytest.fixture(autouse=True)
def poison_kernel_outputs():
    """Every buffer a kernel launch allocates starts as NaN during tests."""
    from lorafuse.kernels import utils

    old = utils.POISON_OUTPUTS
    utils.POISON_OUTPUTS = True
    yield
    utils.POISON_OUTPUTS = old


@pytest.fixture
def seeded():
    """A fresh seed per test run (printed on failure) so inputs are new each run yet reproducible."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    return seed


def pytest_report_header(config):
    import triton

    mode = "CUDA " + torch.cuda.get_device_name() if HAS_CUDA else "CPU, TRITON_INTERPRET=" + os.environ.get(
        "TRITON_INTERPRET", "0")
    return f"lorafuse kernels on: {mode}; torch {torch.__version__}, triton {triton.__version__}"


@pytest.fixture
def torch_backend():
    """Pipeline tests (training, studies, CLI) run the layers' plain-torch path: the kernels have
    their own tests, and the interpreter would make a few training steps take minutes."""
    from lorafuse.ops import use_backend

    with use_backend("torch"):
        yield


def compile_in_subprocess(script: str) -> None:
    """Run a script that compiles kernels for a GPU target (triton.compile, no GPU needed) in a
    process without TRITON_INTERPRET; it prints "compiled" when every kernel built. Skips where
    the triton install has no ptxas."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and ("ptxas" in done.stderr and "not found" in done.stderr):
        pytest.skip("no ptxas with this triton install")
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
