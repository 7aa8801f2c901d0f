"""The `melora-tune` command line. User errors print one line on stderr and exit with status 2."""

from __future__ import annotations

import argparse
import os
import sys

from melora_tune import __version__
from melora_tune.errors import UsageError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem and where help is."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="melora-tune", description=__doc__)
    parser.add_argument("--version", action="version", version=f"melora-tune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    from melora_tune.budget_cli import add_budget_parser

    add_budget_parser(sub)
    try:
        from melora_tune.trial.cli import add_train_parser
    except ImportError:  # the trial package is optional while it is being built
        pass
    else:
        add_train_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Quiet third-party chatter that would bury our one-line messages.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        print(f"melora-tune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("melora-tune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
