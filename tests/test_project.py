"""The README's two set-up commands and CI stay in step."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.strip().splitlines() if line.strip()]


def test_readme_opens_with_two_setup_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    assert commands[0].endswith("balancedmix demo")
    assert "pytest" in commands[1]
    assert commands[0].startswith("pip install torch==2.13.0")


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert _readme_commands()[1] in ci_lines


def test_torch_pinned_below_next_release():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"torch>=2.4,<2.14"' in text
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()
