"""The documentation's examples run: every self-contained ```python block of README.md and docs/*.md
(it starts with an import and needs no files, data or model of the user's) runs in a fresh process,
and where a print's comment gives a torch.Size or a repr, the output shows it; examples/compose_example.py
runs end to end. Blocks that need a GPU run where there is one."""
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

from conftest import HAS_CUDA

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Blocks that stand for the user's own files, data or models are illustrations, not runnable as they are.
NEEDS_USER_FILES = ("path/to", '"adapters/', "load_task(")


def _blocks():
    out = []
    for doc in [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md")):
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), re.S)):
            first = block.strip().splitlines()[0]
            if first.startswith(("import ", "from ")) and not any(k in block for k in NEEDS_USER_FILES):
                out.append(pytest.param(block, id=f"{doc.name}-{i}"))
    return out


def _expected_prints(block):
    """The values that `print(...)  # torch.Size([...])`-style comments promise."""
    value = r"(torch\.Size\(\[[^\]]*\]\)|LoraLibrary\([^)]*\))"
    return [m.group(1) for m in re.finditer(r"^print\(.*\)\s+#\s*" + value, block, re.M)]


BLOCKS = _blocks()


def test_the_docs_have_runnable_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("block", BLOCKS)
def test_doc_example_runs(block, tmp_path):
    if '"cuda"' in block and not HAS_CUDA:
        pytest.skip("the example runs on a GPU")
    done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for value in _expected_prints(block):
        assert value in done.stdout, f"expected {value!r} in the output:\n{done.stdout[-2000:]}"


def test_compose_example_runs(tmp_path):
    """examples/compose_example.py: three adapters trained, composed four ways, exported, reloaded
    with peft; the script checks the reload itself and exits non-zero on a mismatch."""
    if importlib.util.find_spec("nevergrad") is None:  # (installed by the test extras; absent on some GPU hosts)
        pytest.skip("examples/compose_example.py runs a LoraHub search, which needs nevergrad")
    script = ROOT / "examples" / "compose_example.py"
    # As a user runs it: on a CPU without TRITON_INTERPRET the layers take the plain-torch path.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" or HAS_CUDA}
    done = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "out")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for method in ("sum", "weighted", "concat", "loramap"):
        assert re.search(rf"{method}: trainable .* peft reload rel\. diff", done.stdout), done.stdout[-2000:]
