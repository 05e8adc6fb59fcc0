"""Switches that make the local server reproduce one manager or agent release's sharp edges.

Without switches the server accepts every request shape that some release
accepts (the union), so any correct client works. Each switch narrows one
behaviour to what a specific release does, so the client's defences can be
tested against it (reference sections in brackets):

=====================  ============================================  ===============
switch                 behaviour                                     releases
=====================  ============================================  ===============
upload-errors-         a failed upload still answers 204 [§2.3]      manager ≥ 25.16
swallowed
list-path-query-only   the list path is read from the query only     manager ≥ 26.3
                       [§4.1]
run-id-snake-only      the run id is read from ``run_id`` only       manager ≥ 25.6
                       [§3.2]
run-id-camel-only      the run id is read from ``runId`` only, and   manager ≤ 25.5
                       required ("runId is missing!")
phase-frame-loss       phase markers conclude the run; frames sent   agent ≥ 25.12
                       while detached are lost [§3.5]
download-get-only      download answers POST with 405 [§5.1]         manager ≤ 24.03.6
download-query-        a GET download ignores its body and reads     manager 23.09.11
first-only             only the first ``files`` query value
absolute-upload-names  upload names must be absolute under           agent 24.03.7 –
                       /home/work [§2.4]                             25.7.0
no-persistent-paths    runs see no ``BACKENDAI_PERSISTENT_PATHS``    agent < 26.4.4
                       with the folders' mount paths [§12]
utf8-names-only        a path that is not UTF-8: a 500 from a body   every release
                       (msgpack refuses it), a different name from
                       a query (yarl decodes it to U+FFFD)
queued-run-wedge       a run queued behind another, once activated,  every release
                       fails unless it finishes at once; every later
                       run waits for good (``next_output_queue``)
bare-agent-errors      an agent failure is a bare 500 without        manager ≥ 26.1
                       ``agent-details``
aiohttp-filenames      upload names as aiohttp's ``BodyPartReader``  every release
                       reads them: leading ``/`` stripped, no
                       %-decoding, ``filename*`` preferred, ``None``
                       for two ``;``
agent-call-retries     a failed agent call (run, listing, download,  manager 25.16 –
                       upload) is made three times, 0.1 and 0.2 s    25.19
                       apart, before the manager answers
=====================  ============================================  ===============
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Compat:
    upload_errors_swallowed: bool = False
    list_path_query_only: bool = False
    run_id_snake_only: bool = False
    run_id_camel_only: bool = False
    phase_frame_loss: bool = False
    download_get_only: bool = False
    download_query_first_only: bool = False
    absolute_upload_names: bool = False
    no_persistent_paths: bool = False
    aiohttp_filenames: bool = False
    bare_agent_errors: bool = False
    queued_run_wedge: bool = False
    utf8_names_only: bool = False
    terminating_window: bool = False
    agent_call_retries: bool = False

    @staticmethod
    def explained() -> dict[str, str]:
        """One line per switch: what it reproduces, and where (for ``baifs serve --help``)."""
        return {
            "upload-errors-swallowed": "a failed upload still answers 204 (manager >= 25.16)",
            "list-path-query-only": "the list path is read from the query only (manager >= 26.3)",
            "run-id-snake-only": "the run id is read from run_id only (manager >= 25.6)",
            "run-id-camel-only": "the run id is read from runId only, and is required (manager <= 25.5)",
            "phase-frame-loss": "phase markers end the run; output sent while detached is lost "
            "(agent >= 25.12)",
            "download-get-only": "download answers POST with 405 (manager <= 24.03.6)",
            "download-query-first-only": "a GET download reads only the first files value of the query "
            "(manager 23.09.11)",
            "absolute-upload-names": "upload names must be absolute under /home/work "
            "(agent 24.03.7 - 25.7.0)",
            "no-persistent-paths": "runs see no BACKENDAI_PERSISTENT_PATHS (agent < 26.4.4)",
            "terminating-window": "a destroyed session is TERMINATING for 3 s, its requests answered "
            "with the agents' 500s, before it is gone (404) (every release)",
            "utf8-names-only": "a path not UTF-8 fails in a body (msgpack, 500) and loses its bytes in a "
            "query (U+FFFD) (every release)",
            "queued-run-wedge": "a run queued behind another breaks the session's runs for good once "
            "activated, unless it finishes within 2 s (every agent)",
            "bare-agent-errors": "an agent failure answers a bare 500 internal-server-error, no "
            "agent-details (manager >= 26.1)",
            "aiohttp-filenames": "upload names read by aiohttp: a leading / stripped, no %-decoding, "
            "filename* preferred, none with two ';' (every release)",
            "agent-call-retries": "a failed agent call is made three times, 0.1 and 0.2 s apart, "
            "before the manager answers (manager 25.16 - 25.19)",
        }

    @classmethod
    def names(cls) -> list[str]:
        return [field.name.replace("_", "-") for field in fields(cls)]

    @classmethod
    def from_names(cls, names: list[str]) -> Compat:
        unknown = sorted(set(names) - set(cls.names()))
        if unknown:
            raise ValueError(
                f"unknown compatibility switch {', '.join(unknown)}; known: {', '.join(cls.names())}"
            )
        return cls(**{name.replace("-", "_"): True for name in names})

    def enabled(self) -> list[str]:
        return [name for name in self.names() if getattr(self, name.replace("-", "_"))]
