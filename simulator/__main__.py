"""``python -m simulator --help``."""

from simulator.cli import main

main()
