"""The README's promise to a new user: after the quick start, its examples (plain `chatdb`)
work as written. `.ci/run` runs the two quick-start commands themselves."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
ACTIVATE = re.compile(r"(\.|source) \.venv/bin/activate")


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def shell_lines(text: str) -> list[str]:
    """The lines of the ```sh blocks of ``text``."""
    return [line for block in re.findall(r"```sh\n(.*?)```", text, re.DOTALL) for line in block.splitlines()]


def test_the_examples_call_plain_chatdb_and_the_quick_start_puts_it_on_the_path():
    quick_start = shell_lines(section("Quick start"))
    examples = [line for line in shell_lines(README) if line not in quick_start]
    assert any(line.startswith("chatdb ") for line in examples)  # what needs the activation
    assert [line for line in quick_start if ACTIVATE.fullmatch(line.strip())], quick_start
    # The quick start stays two commands, each behind its marker for .ci/run.
    for marker in ("run", "test"):
        assert section("Quick start").count(f"<!-- quickstart:{marker} -->\n```sh\n") == 1


def test_the_activation_of_the_quick_start_puts_chatdb_on_the_path():
    """Run the README's activation line as written, in a shell that has no chatdb."""
    if not (ROOT / ".venv" / "bin" / "activate").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"no {ROOT}/.venv: .ci/run makes it with the quick start")
        pytest.skip(f"no {ROOT}/.venv: the quick start was not run in this checkout")
    (activation,) = [line for line in shell_lines(section("Quick start")) if ACTIVATE.fullmatch(line.strip())]
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/")}
    done = subprocess.run(
        ["bash", "-c", f"! command -v chatdb && {activation} && chatdb --version"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("chatdb "), done.stdout
