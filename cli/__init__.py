"""The ``tokenmill`` commands, one module per command or group (``cli.main`` assembles them).

The commands are this package's alone: they drive every other part (the API server, the workers,
the ledger, the simulator), and no other part imports them. Importing ``cli`` loads nothing.
"""
