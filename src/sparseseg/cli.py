"""The ``sparseseg`` console script: parses arguments and calls the library. Nothing else lives here.

Each subcommand is one ``_add_<name>`` function that declares its flags and the library call it makes;
``main`` turns every :class:`SparsesegError` (bad input, bad checkpoint, bad flag) into a one-line message and a
non-zero exit, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from sparseseg import __version__
from sparseseg.errors import SparsesegError

log = logging.getLogger("sparseseg")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparseseg",
        description="Fast 3D medical image segmentation with sparse visual tokens.",
    )
    parser.add_argument("--version", action="version", version=f"sparseseg {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug-level log messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_models(sub)
    return parser


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the registered models and their presets")

    def run(args: argparse.Namespace) -> int:
        from sparseseg.models.registry import list_models, list_presets

        for name in list_models():
            sys.stdout.write(f"{name}  (presets: {', '.join(list_presets(name))})\n")
        return 0

    p.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except SparsesegError as err:
        sys.stderr.write(f"sparseseg {args.command}: error: {err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
