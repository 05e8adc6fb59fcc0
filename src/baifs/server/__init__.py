"""``baifs serve``: a local server that speaks the Backend.AI session API."""
