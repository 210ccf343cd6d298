"""``python -m shoal``: the command line."""

from shoal.cli.main import main

main()
