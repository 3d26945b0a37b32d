"""Every snippet in the README is real: quoted from a file the tests run.

The README marks each fenced block with an HTML comment on the line before it:

* ``<!-- example: examples/readme/NAME.py -->`` before a ``python`` or ``c``
  block: the block's lines stand, contiguous and verbatim, in that file, and
  the file is run (Python) or compiled against the installed header (C) here.
* ``<!-- output: examples/readme/NAME.py -->`` before a ``text`` block: every
  line of the block appears, in order, in what that program prints (stdout
  and stderr); ``...`` inside a line matches anything (addresses, paths).
* ``<!-- commands: setup -->`` before the ``sh`` block of set-up commands:
  the test command is the one ``.ci/run`` runs, verbatim.
* ``<!-- commands: examples/readme/NAME.sh -->`` before another ``sh`` block:
  its lines stand in that script, which is run here.

A fenced block with no marker fails the test, so the README cannot drift
from what the code does.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from sanitizers import is_writev_of_freed_cffi_memory, own_sanitizer_log, sanitizer_active, sanitizer_reports

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKER = re.compile(r"^<!-- (example|output|commands): (\S+) -->$")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    marker: Optional[str]  # "example" / "output" / "commands"
    target: Optional[str]


def readme_blocks(path: Path = README) -> List[Block]:
    """The fenced blocks of a Markdown file, each with the marker on the line before it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: List[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start = i
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        marker = MARKER.match(lines[start - 1]) if start > 0 else None
        blocks.append(Block(start + 1, m.group(1), "\n".join(lines[start + 1:j]),
                            marker.group(1) if marker else None, marker.group(2) if marker else None))
        i = j + 1
    return blocks


BLOCKS = readme_blocks()
GATHER = "src/ptrbridge/demo_programs/gather.py"  # the README's example of a use-after-free
EXAMPLES = sorted({b.target for b in BLOCKS if b.marker == "example" and b.target})
OUTPUTS: Dict[str, List[Block]] = {}
for _b in BLOCKS:
    if _b.marker == "output" and _b.target:
        OUTPUTS.setdefault(_b.target, []).append(_b)


def _contains_lines(haystack: str, needle: str) -> bool:
    """Whether needle's lines stand contiguously in haystack (trailing blanks ignored)."""
    hay = [line.rstrip() for line in haystack.splitlines()]
    need = [line.rstrip() for line in needle.splitlines()]
    return any(hay[k:k + len(need)] == need for k in range(len(hay) - len(need) + 1))


def _line_pattern(line: str) -> "re.Pattern[str]":
    return re.compile(".*?".join(re.escape(part) for part in line.strip().split("...")))


def _output_matches(output: str, expected: str) -> Optional[str]:
    """None if every expected line is found in order in output, else the first line that was not."""
    out_lines = output.splitlines()
    pos = 0
    for line in expected.splitlines():
        if not line.strip():
            continue
        pattern = _line_pattern(line)
        while pos < len(out_lines) and not pattern.search(out_lines[pos]):
            pos += 1
        if pos == len(out_lines):
            return line
        pos += 1
    return None


def test_every_block_is_marked() -> None:
    unmarked = [f"README.md:{b.line} ({b.lang or 'no language'})" for b in BLOCKS if b.marker is None]
    assert not unmarked, f"README blocks with no example/output/commands marker: {unmarked}"
    wrong = [f"README.md:{b.line}" for b in BLOCKS
             if (b.marker == "example" and b.lang not in ("python", "c"))
             or (b.marker == "output" and b.lang != "text")
             or (b.marker == "commands" and b.lang != "sh")]
    assert not wrong, f"README blocks whose language does not fit their marker: {wrong}"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.marker in ("example", "commands")
                                   and b.target != "setup"], ids=lambda b: f"README.md:{b.line}")
def test_block_is_quoted_from_its_file(block: Block) -> None:
    assert block.target is not None
    path = ROOT / block.target
    assert path.is_file(), f"README.md:{block.line} quotes {block.target}, which does not exist"
    assert _contains_lines(path.read_text(encoding="utf-8"), block.text), (
        f"README.md:{block.line}: the block is not a verbatim part of {block.target}")


def test_output_blocks_name_a_run_example() -> None:
    for target, blocks in OUTPUTS.items():
        assert target in EXAMPLES or target.endswith(".sh"), (
            f"README.md:{blocks[0].line}: output of {target}, which no example block quotes")


def _run(cmd: List[str], timeout: float = 240,
         extra_env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    env = dict(os.environ, **(extra_env or {}))
    # `python` in the README's commands is the interpreter running the tests
    env["PATH"] = os.pathsep.join((os.path.dirname(sys.executable), env.get("PATH", "")))
    for name in ("PTRBRIDGE_CHECK", "PTRBRIDGE_QUARANTINE", "PTRBRIDGE_STRICT"):
        env.pop(name, None)
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("target", [t for t in EXAMPLES if t.endswith(".py")])
def test_python_example_runs_and_prints_what_the_readme_shows(target: str, tmp_path: Path) -> None:
    proc = _run([sys.executable, target], extra_env=own_sanitizer_log(tmp_path))
    output = proc.stdout + proc.stderr
    reports = sanitizer_reports(tmp_path)
    if target == GATHER and sanitizer_active():
        # The README's gather.py has a use-after-free on purpose, and run plainly under ASan or
        # TSan (.ci/sanitize) it stops there: the sanitizer's report of that bug is all it prints.
        assert proc.returncode != 0 and len(reports) == 1 and is_writev_of_freed_cffi_memory(reports[0]), reports
        return
    assert reports == []
    assert proc.returncode == 0, f"{target} exited {proc.returncode}:\n{output}"
    for block in OUTPUTS.get(target, []):
        missing = _output_matches(output, block.text)
        assert missing is None, (
            f"README.md:{block.line} shows {missing!r}, which {target} does not print:\n{output}")


@pytest.mark.parametrize("target", [t for t in EXAMPLES if t.endswith(".c")])
def test_c_example_compiles_against_the_installed_header(target: str, tmp_path: Path) -> None:
    import ptrbridge

    include = ptrbridge.get_include() if hasattr(ptrbridge, "get_include") else str(ROOT / "csrc")
    proc = _run(["gcc", "-std=c11", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared", f"-I{include}",
                 f"-I{sysconfig.get_paths()['include']}", target, "-o", str(tmp_path / "example.so")])
    assert proc.returncode == 0, f"{target} does not compile:\n{proc.stderr}"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.marker == "commands" and b.target != "setup"],
                         ids=lambda b: f"README.md:{b.line}")
def test_command_script_runs(block: Block) -> None:
    assert block.target is not None
    proc = _run(["bash", block.target], timeout=540)
    output = proc.stdout + proc.stderr
    for out in OUTPUTS.get(block.target, []):
        missing = _output_matches(output, out.text)
        assert missing is None, f"README.md:{out.line} shows {missing!r}, which {block.target} does not print:\n{output}"


def test_setup_commands_are_what_ci_runs() -> None:
    (setup,) = [b for b in BLOCKS if b.marker == "commands" and b.target == "setup"]
    lines = [line.split("#")[0].strip() for line in setup.text.splitlines() if line.strip()]
    assert len(lines) == 2, f"README.md:{setup.line}: expected two set-up commands, found {lines}"
    install_demo, test = lines
    assert install_demo == "pip install . && python -m ptrbridge demo"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert any(line.strip() == test for line in ci.splitlines()), (
        f".ci/run does not run the README's test command {test!r} verbatim")


def test_the_output_matcher() -> None:
    assert _output_matches("a\nptrbridge: x at app.py:14 y\nz", "ptrbridge: x at ...:14 y") is None
    assert _output_matches("b\na", "a\nb") == "b"
    assert _contains_lines("x\n  y\nz\n", "  y\nz")
    assert not _contains_lines("x\ny\n", "y\nx")
