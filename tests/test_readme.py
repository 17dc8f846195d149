"""The README's "Bring your own model" section runs as written and prints what the README shows.

Its first bash block builds a tiny random GPT-2 and retrofits it (`memfit retrofit`); the fenced block
after it is that command's stdout. Its second block serves the directory, ingests a fact, asks through
/generate and /v1/chat/completions (plain and streamed, curl and the official `openai` client), rolls
back; each `# ` line in it is a line the commands print. Both blocks run in bash with the paths under
/tmp moved into the test's directory, port 8731 moved to a free one and `.venv/bin/` the running
interpreter's; printed ids and times (job ids, completion ids, `created`) are compared by shape.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port

SECTION = "### Bring your own model: `memfit retrofit`"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.M | re.S)
# what differs from run to run, replaced by its shape on both sides
VOLATILE = [
    (re.compile(r"\bj_[0-9a-f]{16}\b"), "j_<id>"),
    (re.compile(r"\bchatcmpl-[0-9a-f]{24}\b"), "chatcmpl-<id>"),
    (re.compile(r'"created": ?\d+'), '"created": <t>'),
]


def section_blocks() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start)
    nxt = text.find("\n### ", start + len(SECTION))
    end = min(e for e in (end, nxt, len(text)) if e != -1)
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(text[start:end])]


def normalise(text: str) -> str:
    for pattern, shape in VOLATILE:
        text = pattern.sub(shape, text)
    return text


def run_bash(script: str, tmp: Path, port: int, timeout: float) -> subprocess.CompletedProcess:
    """`script` as the README's reader would run it from the repository root, its own process group
    killed afterwards (the served model's `memfit serve` is in it)."""
    script = localise(script, tmp, port)
    env = {**os.environ, "MEMFIT_HOME": str(tmp / "home"), "PYTHONUNBUFFERED": "1"}
    env.pop("MEMFIT_REDIS_URL", None)
    proc = subprocess.Popen(
        ["bash", "-c", script],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the README block ran past {timeout} s:\n{out}\n{err[-3000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def localise(text: str, tmp: Path, port: int) -> str:
    bindir = Path(sys.executable).parent
    return text.replace("/tmp/", f"{tmp}/").replace("8731", str(port)).replace(".venv/bin/", f"{bindir}/")


@pytest.mark.slow
@pytest.mark.integration
def test_the_retrofit_section_runs_as_written(tmp_path):
    blocks = section_blocks()
    bash = [code for lang, code in blocks if lang == "bash"]
    printed = [code for lang, code in blocks if lang == ""]
    assert len(bash) == 2 and len(printed) == 1, [lang for lang, _ in blocks]
    port = free_port()

    res = run_bash(bash[0], tmp_path, port, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    want = localise(printed[0], tmp_path, port)
    assert res.stdout == want, f"README shows:\n{want}\nthe commands printed:\n{res.stdout}"

    res = run_bash(bash[1], tmp_path, port, timeout=600)
    log = tmp_path / "gpt2-serve.log"
    shown = [line[2:] for line in bash[1].splitlines() if line.startswith("# ")]
    got = normalise(res.stdout).splitlines()
    want_lines = normalise(localise("\n".join(shown), tmp_path, port)).splitlines()
    assert got == want_lines, (
        "README shows:\n" + "\n".join(want_lines) + "\nthe commands printed:\n" + "\n".join(got)
        + f"\nstderr: {res.stderr[-2000:]}\nserver log: {log.read_text()[-3000:] if log.exists() else ''}"
    )  # fmt: skip
