"""The Backend.AI session API: client, request signing, payload formats, errors."""
