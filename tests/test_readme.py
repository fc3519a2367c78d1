"""The README's two commands are the ones users and CI run."""

from __future__ import annotations

import re

from tests.conftest import REPO


def readme_commands() -> list[str]:
    first_screen = (REPO / "README.md").read_text().split("\n## ", 2)
    block = "\n".join(first_screen[:2])
    return re.findall(r"```bash\n(.+?)\n```", block, flags=re.S)


def test_first_screen_has_the_run_and_test_commands():
    commands = readme_commands()
    assert len(commands) == 2
    assert commands[0].endswith("fedtune simulate")
    assert commands[1].endswith("python -m pytest")


def test_ci_runs_the_readmes_test_command():
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == readme_commands()[1]
