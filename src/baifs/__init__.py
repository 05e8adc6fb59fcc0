"""baifs: mount a Backend.AI compute session's /home/work as a local directory."""

__version__ = "0.1.0"
