"""``python -m simulator --help``: the ``tokenmill simulate`` command."""

from cli.simulate import main

main()
