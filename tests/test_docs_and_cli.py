"""The Python examples of the README and of docs/laws.md's symbolic section run as written
(docs/laws.md's race-law examples are checked by tests/test_laws.py), and the main-job CLI works."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_blocks_run(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 2
    symbolic = (ROOT / "docs" / "laws.md").read_text().split("## Exact laws with symbolic rates")[1]
    blocks += re.findall(r"```python\n(.*?)```", symbolic, re.S)
    script = tmp_path / "readme_examples.py"      # specs need a source file to be read from
    script.write_text("\n".join(blocks))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "96 16 1" in out.stdout                # K4: 96 traces, 16 trees, total probability 1


def test_readme_commands_match_ci():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in readme                           # .ci/run runs exactly the README test command


def test_cli_check_passes_on_every_builtin(capsys):
    from structdsl.__main__ import BUILTIN_CASES, main
    assert main(["check", "--samples", "400", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert f"{len(BUILTIN_CASES)}/{len(BUILTIN_CASES)} specs pass" in out
    for name, _, _ in BUILTIN_CASES:
        assert re.search(rf"^{name}\s.*accepted\s+pass", out, re.M), name


def test_reference_backend_needs_numpy_only():
    """Importing structdsl and sampling loads neither numba, torch, scipy, networkx nor hypothesis."""
    code = ("import sys, numpy as np, structdsl\n"
            "from structdsl.specs import spanning_tree\n"
            "structdsl.compile(spanning_tree).sample(np.zeros((4, 4)), seed=0)\n"
            "heavy = {'numba', 'torch', 'scipy', 'networkx', 'hypothesis', 'matplotlib'}\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_experiment_command_reaches_the_experiments_cli(capsys):
    from structdsl.__main__ import main
    try:
        main(["experiment", "--help"])
    except SystemExit as exc:
        assert exc.code == 0
    out = capsys.readouterr().out
    assert "graph-layout" in out and "bias-variance" in out and "listops" in out
    assert out.startswith("usage: python -m structdsl experiment ")     # the command the user typed
