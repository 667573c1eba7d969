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
