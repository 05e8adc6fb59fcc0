"""Shell scripts that run inside the session: every path quoted, every step accounted for.

Owns the one way a path reaches a shell. A path is a relative `bytes` path
under ``/home/work`` (``b""`` is ``/home/work`` itself); in a script it
becomes a single shell word:

- if its bytes are UTF-8, `shlex.quote` of the text (names with quotes,
  ``$(...)``, newlines or a leading ``-`` included; commands also get ``--``);
- otherwise a variable set from ``printf`` octal escapes, so the script itself
  stays plain UTF-8 for the JSON request that carries it, and raw bytes reach
  the file system unchanged. A sentinel keeps trailing newlines, which command
  substitution would strip.

Scripts are POSIX ``sh`` (the agent runs ``/bin/sh -c``, often dash) and run
in ``/home/work``, the runner's working directory, so paths stay relative.

Each step reports how it went on its own line of standard output: ``ok N``,
or ``gone N`` when the path it needs no longer exists (something in the
session removed it), or ``kept N`` when the session holds something there the
step must not touch (a directory that gained entries the mount never saw), or
``skipped N`` when a step it comes after did not succeed (a chmod or touch of
an object whose placement failed: whatever is at that path is not the mount's
object), or ``baifs-failed N`` on standard error after the command's own
message. A failed
step does not stop the others; the script exits 1 if any failed. `StepResults`
reads the report back, with the session's own words for each failed step (the
standard error lines before its mark); no file name ever appears in the marks,
so names with newlines cannot confuse the parser.

A script can also keep its report in a file in the session (``report_to``),
line by line as the steps go: when the answer that carried the output is
lost, that file still says which steps happened.
"""

from __future__ import annotations

import shlex
from collections.abc import Collection
from dataclasses import dataclass, field

FAILURE_MARK = "baifs-failed"


def is_utf8(path: bytes) -> bool:
    try:
        path.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class ShellScript:
    def __init__(self) -> None:
        self._prelude: list[str] = []
        self._lines: list[str] = []
        self._variables = 0
        self.descriptions: list[str] = []
        #: the shell word of the file the report is also appended to, if any.
        self.report_to: str | None = None

    def word(self, path: bytes) -> str:
        """The shell word for a relative path."""
        if not path:
            return "."
        if is_utf8(path):
            return shlex.quote(path.decode("utf-8"))
        self._variables += 1
        name = f"p{self._variables}"
        escaped = "".join(f"\\{byte:03o}" for byte in path)
        self._prelude.append(f"{name}=$(printf '{escaped}x'); {name}=${{{name}%x}}")
        return f'"${name}"'

    def step(
        self,
        command: str,
        description: str,
        *,
        needs: str | None = None,
        keeps: str | None = None,
        after: Collection[int] = (),
    ) -> int:
        """Add a command and return its step number.

        ``needs`` is a shell word for a path that must exist for the step to
        make sense; when it does not, the step reports ``gone`` instead of
        running. ``keeps`` is a shell condition under which the step must not
        run because the session holds something there the mount never saw; it
        then reports ``kept``. ``after`` are earlier steps that must have
        succeeded in this run of the script; otherwise it reports ``skipped``.
        """
        number = len(self.descriptions)
        self.descriptions.append(description)
        attempt = (
            f"if {{ {command}; }}; then ok{number}=1; say 'ok {number}'; "
            f"else say '{FAILURE_MARK} {number}' >&2; failed=1; fi"
        )
        if keeps is not None:
            attempt = f"if {keeps}; then say 'kept {number}'; else {attempt}; fi"
        if needs is not None:
            attempt = f"if [ -e {needs} ] || [ -L {needs} ]; then {attempt}; else say 'gone {number}'; fi"
        if after:
            done = " && ".join(f'[ "${{ok{step}:-}}" = 1 ]' for step in sorted(after))
            attempt = f"if {done}; then {attempt}; else say 'skipped {number}'; fi"
        self._lines.append(attempt)
        return number

    def raw(self, line: str) -> None:
        """A line that reports nothing (clean-up)."""
        self._lines.append(line)

    def render(self) -> str:
        say = 'say() { echo "$1"; }'
        if self.report_to is not None:
            say = f'say() {{ echo "$1"; echo "$1" >> {self.report_to}; }}'
        lines = ["failed=0", say, *self._prelude, *self._lines, 'exit "$failed"']
        return "\n".join(lines) + "\n"


@dataclass
class StepResults:
    """What a script's report says of each step.

    ``complete`` is False when part of the report may be missing (an answer
    was lost on the way): a step it does not mention may or may not have
    happened, and counts as not done without being a failure.
    """

    ok: set[int] = field(default_factory=set)
    gone: set[int] = field(default_factory=set)
    kept: set[int] = field(default_factory=set)
    #: steps not run because one they come after did not succeed: not done, and not a refusal.
    skipped: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)
    #: what the session said of each failed step (its command's standard error).
    words: dict[int, str] = field(default_factory=dict)
    descriptions: list[str] = field(default_factory=list)
    complete: bool = True
    #: a step the report does not mention may have happened (the report is incomplete, and the
    #: script ran); False where it is known to have not (`none_ran`).
    maybe: bool = False

    @classmethod
    def parse(
        cls, stdout: str, stderr: str, descriptions: list[str], *, complete: bool = True
    ) -> StepResults:
        """Read a script's report; in a complete one, steps that reported nothing count as failed."""
        results = cls(descriptions=list(descriptions), complete=complete, maybe=not complete)
        outcomes = {
            "ok": results.ok,
            "gone": results.gone,
            "kept": results.kept,
            "skipped": results.skipped,
            FAILURE_MARK: results.failed,
        }
        # Marks come on both streams (a report file holds them all); the lines before a
        # failure mark on standard error are the session's words for that step.
        for on_stderr, stream in ((False, stdout), (True, stderr)):
            said: list[str] = []
            for line in stream.splitlines():
                kind, _, number = line.partition(" ")
                if kind in outcomes and number.isdigit():
                    outcomes[kind].add(int(number))
                    if kind == FAILURE_MARK and on_stderr:
                        results.words[int(number)] = " ".join(said)
                    said = []
                elif line.strip():
                    said.append(line.strip())
        if complete:
            reported = results.ok | results.gone | results.kept | results.skipped
            results.failed |= set(range(len(descriptions))) - reported
        return results

    @classmethod
    def all_ok(cls, descriptions: list[str]) -> StepResults:
        """The report of a script known to have run every step successfully."""
        return cls(ok=set(range(len(descriptions))), descriptions=list(descriptions))

    @classmethod
    def none_ran(cls, descriptions: list[str]) -> StepResults:
        """The report of a script that never started."""
        return cls(descriptions=list(descriptions), complete=False)

    def failed_descriptions(self) -> list[str]:
        """Each failed step, with the session's words for it when it said any."""
        return [
            f"{self.descriptions[step]}: {self.words[step]}"
            if self.words.get(step)
            else self.descriptions[step]
            for step in sorted(self.failed)
        ]

    def done(self, step: int | None) -> bool:
        """A step that did not exist counts as done."""
        return step is None or step in self.ok
