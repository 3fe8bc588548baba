"""Every command the README shows resolves: its program exists (a make target, a tools/ script, a
console script, a file under .venv/bin), the repository paths it names exist, and each Python
tool it runs answers ``--help``. The checker itself is tested on commands that must fail."""

from __future__ import annotations

import glob
import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# Words that start a command in the README (after optional VAR=value assignments).
PROGRAMS = ("make", "python", "python3", "torchrun", "pip")
PREFIXES = ("tools/", ".venv/", "spp-triton-", "/usr/bin/time")
# Repository folders whose paths, when a command names them, must exist.
CHECKED_DIRS = ("configs/", "tools/", "benchmarks/", "requirements/", "spp_triton/", "tests/")


def readme_commands(text: str) -> list[str]:
    """Commands in ```bash blocks (line by line, comments dropped) and in inline code spans."""
    commands = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    for span in re.findall(r"`([^`\n]+)`", text.replace("```", "")):
        words = span.split()
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            words = words[1:]
        if words and (
            words[0] in PROGRAMS
            or words[0].startswith(PREFIXES)
            or (words[0].startswith("benchmarks/") and words[0].endswith(".py"))
        ):
            commands.append(span)
    return commands


def _brace_expand(word: str) -> list[str]:
    m = re.search(r"\{([^{}]*,[^{}]*)\}", word)
    if not m:
        return [word]
    return list(
        itertools.chain.from_iterable(
            _brace_expand(word[: m.start()] + alt + word[m.end() :])
            for alt in m.group(1).split(",")
        )
    )


def _make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([a-zA-Z][\w-]*):", text, flags=re.M))


def _console_scripts() -> set[str]:
    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])


def problems(command: str) -> tuple[list[str], list[str]]:
    """(what does not resolve, Python scripts to run with --help) for one README command."""
    bad, scripts = [], []
    try:
        words = shlex.split(command)
    except ValueError as e:
        return [f"{command!r}: does not parse ({e})"], []
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        words = words[1:]
    if words[:1] == ["/usr/bin/time"]:
        words = words[1:]
    if not words:
        return bad, scripts
    prog, args = words[0], words[1:]
    if prog == "make":
        targets = [a for a in args if "=" not in a and not a.startswith("-")]
        bad += [f"{command!r}: no make target {t!r}" for t in targets if t not in _make_targets()]
        return bad, scripts
    if prog.startswith("spp-triton-"):
        if prog not in _console_scripts():
            bad.append(f"{command!r}: {prog} is not a console script of pyproject.toml")
    elif prog.startswith((".venv/", "tools/", "benchmarks/")):
        if not (REPO / prog).exists():
            bad.append(f"{command!r}: {prog} does not exist")
        elif prog.endswith("/python") and args and args[0].endswith(".py"):
            scripts.append(args[0])
        elif prog.endswith(".py"):
            scripts.append(prog)
            if not os.access(REPO / prog, os.X_OK):
                bad.append(f"{command!r}: {prog} is not executable (run as a program)")
        elif prog.endswith("/torchrun") and args:
            script = next((a for a in args if a.endswith(".py")), None)
            if script:
                scripts.append(script)
    elif prog in ("python", "python3") and args and args[0].endswith(".py"):
        scripts.append(args[0])
    for arg in args:
        for word in _brace_expand(arg.split("=", 1)[-1]):
            if (
                word.startswith(CHECKED_DIRS)
                and "..." not in word
                and not glob.glob(str(REPO / word))
            ):
                bad.append(f"{command!r}: {word} does not exist")
    for script in scripts:
        if not (REPO / script).is_file():
            bad.append(f"{command!r}: {script} does not exist")
    return bad, [s for s in scripts if (REPO / s).is_file()]


def test_the_checker_catches_broken_commands():
    assert problems(".venv/torchrun --nproc-per-node 2 tools/train_net.py")[0]
    assert problems("make nonexistent-target")[0]
    assert problems("tools/no_such_tool.py --help")[0]
    assert problems("spp-triton-nothing --help")[0]
    assert problems(".venv/bin/python tools/train_net.py --config-file configs/Shapes/x.yaml")[0]
    assert not problems("make demo")[0]
    assert problems("tools/train_net.py --config-file configs/Shapes/{a,b}.yaml")[0]
    ok, scripts = problems(
        "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cpu_path_vs_torchvision.py"
    )
    assert not ok and scripts == ["benchmarks/cpu_path_vs_torchvision.py"]
    assert "make demo" in readme_commands("```bash\nmake demo   # comment\n```\n")
    assert readme_commands("run `tools/x.py --flag` and `not a command`") == ["tools/x.py --flag"]


def test_every_readme_command_resolves():
    commands = readme_commands(README.read_text())
    assert len(commands) >= 15, commands  # the README's usage commands were found
    bad = [p for c in commands for p in problems(c)[0]]
    assert not bad, "\n".join(bad)


@pytest.mark.slow
def test_every_python_tool_the_readme_runs_answers_help():
    scripts = sorted({s for c in readme_commands(README.read_text()) for s in problems(c)[1]})
    assert "tools/train_net.py" in scripts and "tools/compare_heads.py" in scripts
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for script in scripts:
        proc = subprocess.run(
            [sys.executable, script, "--help"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0 and "usage" in proc.stdout.lower(), (
            script,
            proc.stderr[-2000:],
        )


def test_console_scripts_answer_help():
    bin_dir = Path(sys.executable).parent
    for script in sorted(_console_scripts()):
        exe = bin_dir / script
        assert exe.is_file(), f"{script} is not installed next to {sys.executable} (make setup)"
        proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "usage:" in proc.stdout, (script, proc.stderr[-2000:])
