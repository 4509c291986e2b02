"""
The C{dcrouter} command: operator tools beside the daemon.

C{dcrouter checkconfig FILE} checks a configuration exactly as a start or a
reload would (without binding ports), prints every error and exits 1, or
prints a one-line summary and exits 0.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional

from dcrouter.config.errors import ConfigErrors
from dcrouter.service import checkConfigFile


def checkconfig(path: str) -> int:
    try:
        compiled = checkConfigFile(path)
    except ConfigErrors as e:
        print(e.report(), file=sys.stderr)
        print(f"{path}: {len(e.errors)} error(s)", file=sys.stderr)
        return 1
    config = compiled.config
    listeners = sorted(compiled.listenKeys())
    print(
        f"{path}: OK, {len(config.routes)} route(s) on {len(compiled.tables)} port(s), "
        f"{len(listeners)} listener(s)"
    )
    return 0


def routes(path: str) -> int:
    """Print the compiled route table in match order."""
    try:
        compiled = checkConfigFile(path)
    except ConfigErrors as e:
        print(e.report(), file=sys.stderr)
        return 1
    for port in sorted(compiled.tables):
        for line in compiled.tables[port].explain():
            print(line)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="dcrouter", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("checkconfig", help="check a configuration file")
    check.add_argument("file")
    table = commands.add_parser("routes", help="print the route table in match order")
    table.add_argument("file")
    args = parser.parse_args(argv)
    if args.command == "checkconfig":
        return checkconfig(args.file)
    return routes(args.file)


if __name__ == "__main__":
    sys.exit(main())
