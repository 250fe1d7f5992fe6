"""A subcommand's bad flag as one line, not a usage block with the reason at the bottom.

argparse (and jsonargparse) print the whole usage and exit on an unknown or missing flag, so the sentence that says
what to change comes last. The parsers of `export`, `evaluate`, `estimate` and `plot` raise `UsageError` instead;
`sparse-lightning` prints it as its one-line error (exit status 1), and Python callers get an exception, not an exit.
"""

from __future__ import annotations

from typing import Any, NoReturn, TypeVar

Parser = TypeVar("Parser")


class UsageError(ValueError):
    """A command line this subcommand does not take; the message says which flag and where the help is."""


def raise_usage_errors(parser: Parser) -> Parser:
    """`parser` with its `error` raising `UsageError` (one line naming the subcommand and its --help)."""
    prog = getattr(parser, "prog", "sparse-lightning")

    def error(message: str, *_: Any, **__: Any) -> NoReturn:
        first = str(message).strip().splitlines()[0] if str(message).strip() else "bad arguments"
        raise UsageError(f"{prog}: {first} (options: {prog} --help)")

    parser.error = error  # type: ignore[attr-defined]
    return parser
