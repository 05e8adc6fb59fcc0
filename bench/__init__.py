"""Benchmarks: baifs against sshfs and a native directory, with and without network latency."""
