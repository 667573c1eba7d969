"""The repository's promises about itself: CI runs the README's test command."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _readme_test_command() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    cmds = [line.strip() for b in blocks for line in b.splitlines() if "pytest" in line]
    assert cmds, "the README shows no test command"
    return cmds[0]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_test_command() in [line.strip() for line in ci]


def test_no_top_level_kernels_package_is_installed():
    # Another popular package owns the name `kernels`: ours installs as lorafuse.kernels only.
    import importlib.metadata

    import lorafuse.kernels

    top = importlib.metadata.distribution("lorafuse").read_text("top_level.txt").split()
    assert top == ["lorafuse"]
    assert lorafuse.kernels.__name__ == "lorafuse.kernels"


def _run_from_root(code: str):
    import subprocess
    import sys

    # `python -c` puts the current folder first on the path: the repository's root, with its kernels/
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_kernels_folder_does_not_shadow_the_kernels_package_from_the_root():
    """Run from the repository's root, `import kernels` (transformers probes and imports that name) must
    not get lorafuse's kernel folder: it gets Hugging Face's package where that is installed, else an
    empty module without a file; peft and transformers import either way."""
    import importlib.util

    r = _run_from_root("import kernels; print(getattr(kernels, '__file__', None))")
    assert r.returncode == 0, r.stderr
    found = r.stdout.strip()
    other = [p for p in map(pathlib.Path, __import__("sys").path) if p.resolve() != ROOT]
    if any((p / "kernels" / "__init__.py").exists() for p in other):
        assert found != "None" and pathlib.Path(found).resolve().parent != ROOT / "kernels"
    else:
        assert found == "None"
    if importlib.util.find_spec("peft") is not None:
        r = _run_from_root("import peft, transformers, lorafuse.kernels as k; print(k.__name__)")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "lorafuse.kernels"
