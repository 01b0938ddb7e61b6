"""Peers the benchmarks start in .venv-peers, one module each; not benchmarks themselves (make bench runs
benchmarks/*.py only)."""
