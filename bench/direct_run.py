"""Workload 7's reference: one ``true`` batch run through the API client, in a fresh process.

Reads the credentials like ``baifs mount`` does (``BACKEND_*``), negotiates
the API version and runs ``true`` in the session named on the command line,
the way a script using `baifs.api` would.
"""

from __future__ import annotations

import sys

import trio

from baifs import config
from baifs.api.batch import BatchExecutor, BatchSteps
from baifs.api.client import Connection


async def main(session_id: str) -> int:
    async with Connection(config.load_credentials()) as connection:
        await connection.negotiate()
        outcome = await BatchExecutor(connection.session(session_id)).run(BatchSteps(exec="true"))
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(trio.run(main, sys.argv[1]))
