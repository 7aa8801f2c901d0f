"""The `melora-tune` command line. User errors print one line on stderr and exit with status 2; a machine that stops a
command (a local Ray that does not start) prints one line and exits with status 1."""

from __future__ import annotations

import argparse
import os
import sys

from melora_tune import __version__
from melora_tune.adapters.cli import add_budget_parser
from melora_tune.cluster import add_cluster_parser
from melora_tune.errors import MachineError, UsageError
from melora_tune.records.ui import add_ui_parser
from melora_tune.report.cli import add_report_parser
from melora_tune.report.export import add_export_parser
from melora_tune.report.table import add_table_parser
from melora_tune.search.cli import add_confirm_parser, add_search_parser
from melora_tune.trial.cli import add_train_parser


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem and where help is."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="melora-tune", description=__doc__)
    parser.add_argument("--version", action="version", version=f"melora-tune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    # in the order a user meets them: size a budget, debug one trial, search, read, export, browse, scale out
    for add in (add_budget_parser, add_train_parser, add_search_parser, add_confirm_parser, add_report_parser, add_export_parser,
                add_table_parser, add_ui_parser, add_cluster_parser):
        add(sub)
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
    except MachineError as err:
        print(f"melora-tune {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("melora-tune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
