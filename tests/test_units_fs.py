"""Unit tests of the mount's pure parts: quoting for the shell, step reports, run requests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from baifs.api.batch import BatchSteps
from baifs.fs.runs import RunRejected, parse_request
from baifs.fs.shell import ShellScript, StepResults
from baifs.runctl import command_line, request_text

pytestmark = pytest.mark.fast

HOSTILE = [
    b"plain.txt",
    b"with space",
    b"quote'double\"",
    b"$(touch pwned)",
    b"`touch pwned2`",
    b"new\nline\n",
    b"-n",
    b"bytes-\xff\xfe",
    b"trailing-newlines\n\n",
    b"*",
]


def test_every_name_reaches_sh_as_one_word(tmp_path: Path) -> None:
    """A real /bin/sh runs the script: each hostile name is created, moved and removed exactly."""
    shell = ShellScript()
    for index, name in enumerate(HOSTILE):
        shell.step(f"printf x > {shell.word(name)}", "create")
        shell.step(f"mv -f -- {shell.word(name)} {shell.word(b'moved-%d-' % index + name)}", "move")
    shell.step(f"rm -f -- {shell.word(b'moved-0-plain.txt')}", "remove")
    finished = subprocess.run(["/bin/sh", "-c", shell.render()], cwd=tmp_path, capture_output=True)
    results = StepResults.parse(finished.stdout.decode(), finished.stderr.decode(), shell.descriptions)
    assert finished.returncode == 0 and not results.failed
    assert results.ok == set(range(len(shell.descriptions)))
    expected = {b"moved-%d-" % index + name for index, name in enumerate(HOSTILE)} - {b"moved-0-plain.txt"}
    assert set(os.listdir(os.fsencode(tmp_path))) == expected
    shell.render().encode("utf-8")  # the script travels in JSON: raw bytes became printf escapes


def test_step_reports_say_ok_gone_and_failed(tmp_path: Path) -> None:
    shell = ShellScript()
    ok = shell.step("true", "works")
    gone = shell.step("rm -- missing", "needs a file", needs=shell.word(b"missing"))
    failed = shell.step("false", "fails")
    finished = subprocess.run(["/bin/sh", "-c", shell.render()], cwd=tmp_path, capture_output=True, text=True)
    results = StepResults.parse(finished.stdout, finished.stderr, shell.descriptions)
    assert finished.returncode == 1
    assert (results.ok, results.gone, results.failed) == ({ok}, {gone}, {failed})
    assert results.failed_descriptions() == ["fails"]
    silent = StepResults.parse("", "", shell.descriptions)
    assert silent.failed == {ok, gone, failed}, "steps that reported nothing did not happen"


@pytest.mark.parametrize(
    ("request_bytes", "steps"),
    [
        (b"make test\n", BatchSteps(exec="make test")),
        (b'build = "make"\nexec = "./app"\n', BatchSteps(exec="./app", build="make")),
        (b'clean = "rm -rf out"\n', BatchSteps(exec="", clean="rm -rf out")),
        (b"FOO=bar ./run.sh", BatchSteps(exec="FOO=bar ./run.sh")),
        ("echo 'héllo'".encode(), BatchSteps(exec="echo 'héllo'")),
    ],
)
def test_run_requests_are_commands_or_step_tables(request_bytes: bytes, steps: BatchSteps) -> None:
    assert parse_request(request_bytes) == steps


@pytest.mark.parametrize(
    ("request_bytes", "reason"),
    [
        (b"", "empty"),
        (b" \n\t", "empty"),
        (b"\xff\xfe", "UTF-8"),
        (b"echo a\0b", "NUL"),
        (b'exec = "x"\nenv = "y"\n', "unknown key"),
        (b"exec = 1\n", "strings"),
        (b'exec = ""\nbuild = "  "\n', "every step is empty"),
        (b"x" * 70_000, "at most"),
    ],
)
def test_bad_run_requests_are_refused_with_a_reason(request_bytes: bytes, reason: str) -> None:
    with pytest.raises(RunRejected, match=reason):
        parse_request(request_bytes)


def test_baifs_run_writes_requests_the_mount_reads_back() -> None:
    words = ["grep", "-r", "two words", "src/$(x)"]
    assert parse_request(request_text(command_line(words), build="make 'all'")) == BatchSteps(
        exec="grep -r 'two words' 'src/$(x)'", build="make 'all'"
    )
    assert command_line(["make test && ./app"]) == "make test && ./app"
    assert parse_request(request_text('printf "%s\\n" "ünïcode" \\\\ tab\there')).exec.endswith("tab\there")
