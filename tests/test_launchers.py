"""Every process a test, example or benchmark starts runs under this interpreter (issue 14, item 23).

A bare ``torchrun`` / ``accelerate`` or a ``shell=True`` command line is resolved through
``PATH``: it fails when the suite is run as ``.venv/bin/python -m pytest`` without activating
the environment, or silently picks another installation. Launch with
``sys.executable -m torch.distributed.run`` instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_CALLS = {"run", "Popen", "call", "check_call", "check_output", "system", "spawnlp", "execvp", "execlp"}
BARE_LAUNCHERS = {"torchrun", "accelerate", "deepspeed", "python", "python3", "pytest"}


def _sources() -> list[Path]:
    files = []
    for folder in ("tests", "examples", "benchmarks", "balancedmix"):
        files.extend(sorted((ROOT / folder).rglob("*.py")))
    return files


def _launch_problems(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    problems = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if name not in LAUNCH_CALLS:
            continue
        where = f"{path.name}:{node.lineno}"
        if name == "system":
            problems.append(f"{where}: os.system goes through the shell")
        for kw in node.keywords:
            if kw.arg == "shell" and isinstance(kw.value, ast.Constant) and kw.value.value is True:
                problems.append(f"{where}: shell=True resolves the command through PATH")
        if node.args:
            first = node.args[0]
            head = None
            if isinstance(first, (ast.List, ast.Tuple)) and first.elts and isinstance(first.elts[0], ast.Constant):
                head = first.elts[0].value
            elif isinstance(first, ast.Constant) and isinstance(first.value, str):
                head = first.value.split()[0] if first.value.split() else None
            if isinstance(head, str) and Path(head).name in BARE_LAUNCHERS:
                problems.append(f"{where}: starts {head!r} from PATH; use sys.executable -m ...")
    return problems


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_processes_are_started_with_the_running_interpreter(path: Path) -> None:
    assert _launch_problems(path) == []


def test_the_scan_catches_a_shell_torchrun(tmp_path: Path) -> None:
    bad = tmp_path / "probe.py"
    bad.write_text(
        "import subprocess, sys\n"
        "subprocess.run('torchrun --nproc_per_node 2 x.py', shell=True)\n"
        "subprocess.run(['torchrun', 'x.py'])\n"
        "subprocess.Popen(['accelerate', 'launch', 'x.py'])\n"
        "subprocess.run([sys.executable, '-m', 'torch.distributed.run', 'x.py'])\n"
    )
    problems = _launch_problems(bad)
    assert len(problems) == 4, problems
