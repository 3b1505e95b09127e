"""Problems a user can fix (a bad file, folder, datalist or checkpoint; a diverged run) and how commands show them.

Code raises ``BundleError`` (or ``InputError``) with one line per problem, naming the file or step and the reason,
and otherwise lets it propagate like any exception, so tests and callers can catch it. At the top of a command, a
BundleError, even one that MONAI or ignite wrapped in their own errors, is printed as those lines alone and the
process exits with status 1; the full traceback is printed only when debugging.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType

# Set to 1 (or pass `--debug True` to a config) to see the full traceback of a reported problem.
DEBUG_VARIABLE = "BRATS_BUNDLE_DEBUG"


class BundleError(Exception):
    """A failure the bundle has diagnosed: each problem is one line that says what and where."""

    def __init__(self, problems: str | Sequence[str]):
        self.problems = [problems] if isinstance(problems, str) else [str(problem) for problem in problems]
        super().__init__("\n".join(self.problems))


class InputError(BundleError, ValueError):
    """Input files, folders, datalists or checkpoints that cannot be used as they are."""


def find_bundle_error(error: BaseException | None) -> BundleError | None:
    """The BundleError that caused `error` (itself, or one in its chain of causes), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, BundleError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def problem_lines(error: BaseException) -> list[str]:
    """The problem lines of the BundleError behind `error`, else one line with the error's type and message."""
    reported = find_bundle_error(error)
    if reported is not None:
        return reported.problems
    return [f"{type(error).__name__}: {error}"]


def debugging(debug: bool = False) -> bool:
    return bool(debug) or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def _print_briefly(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
    reported = find_bundle_error(error)
    if reported is None:
        sys.__excepthook__(kind, error, traceback)
        return
    for line in reported.problems:
        print(f"error: {line}", file=sys.stderr)
    print(f"(set {DEBUG_VARIABLE}=1 for the full traceback)", file=sys.stderr)


def report_briefly(debug: bool = False) -> None:
    """From now on, an uncaught BundleError ends the process with its problem lines only (exit status 1).

    Configs call this in `initialize`; with `debug` (or the environment variable) tracebacks stay as they are, and
    `debug` sets the variable, so that whatever reports a problem in this process or its workers shows them too.
    """
    if debug:
        os.environ[DEBUG_VARIABLE] = "1"
    sys.excepthook = sys.__excepthook__ if debugging(debug) else _print_briefly


@contextmanager
def exit_on_input_error() -> Iterator[None]:
    """For the body of a command-line `main`: an InputError prints its problem lines ("error: ...") on stderr and
    exits with status 1; when debugging (the environment variable), it propagates with its traceback."""
    try:
        yield
    except InputError as error:
        if debugging():
            raise
        for line in error.problems:
            print(f"error: {line}", file=sys.stderr)
        sys.exit(1)
