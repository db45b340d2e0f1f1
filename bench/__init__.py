"""Benchmarks run by hand (``python -m bench.<name>``); each prints its figures next to a baseline
measured in the same run."""

__all__: list[str] = []
