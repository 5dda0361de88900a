"""``python -m mimscale.downstream.sweeps FILE [var=value ...]``: print a sweep's commands, one per
line (pipe them to ``sh`` to run them here, one after another)."""

import sys

from . import expand


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    variables = dict(a.split("=", 1) for a in argv[1:])
    for job in expand(argv[0], variables):
        print(job.command_line())
    return 0


sys.exit(main(sys.argv[1:]))
