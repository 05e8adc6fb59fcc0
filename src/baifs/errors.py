"""The root of baifs's exceptions: every error a user meets is a `BaifsError`.

It lives here, below every package, so that the configuration, the file
system and the server can all raise it without depending on the API client;
`baifs.api.errors` builds the client's failures on it.
"""

from __future__ import annotations


class BaifsError(Exception):
    """Base class of every error baifs reports to a user."""

    #: the exit status of a command that ends with this error.
    exit_status = 1
