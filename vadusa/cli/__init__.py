"""The command-line tools, installed as console scripts (setup.cfg) and mirrored by the top-level scripts.

vadusa-decode       = decode.py          synthesise speech, or --compare (the A/B harness)
vadusa-train-heads  = train_heads.py     train draft heads / the feature drafter, accuracy, trees
vadusa-train-block  = train_block.py     block distillation
vadusa-build-demo   = scripts/build_demo.py   rebuild the shipped demo TTS
vadusa-app          = app.py             the web demo

Every tool reports a user's mistake as one line on stderr with exit status 2: bad arguments as
`<tool>: error: ...` (`Parser`), and the errors the library raises for bad values, files and artifacts as
`error: ...` (`USER_ERRORS`, `reports_user_errors`; the web demo shows the same line). Anything else is a bug
and keeps its traceback.
"""

import argparse
import functools
import sys

# What the library raises for a user's bad value, text, file or artifact. TypeError is not here: the library
# raises ValueError for bad values read from the command line or from files, so a TypeError is a bug.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `prog: error: message (see --help)`, exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def message(e: BaseException) -> str:
    """One line for a user error: an OSError as 'reason: file', anything else its text with newlines folded."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.strerror}: {e.filename}"
    return " ".join(str(e).split()) or type(e).__name__


def reports_user_errors(main):
    """Decorate a CLI's `main(argv) -> int`: a `USER_ERRORS` exception becomes one stderr line and status 2."""

    @functools.wraps(main)
    def wrapped(argv=None) -> int:
        try:
            return main(argv)
        except USER_ERRORS as e:
            print(f"error: {message(e)}", file=sys.stderr)  # the web demo shows the same line (vadusa.web)
            return 2

    return wrapped


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value
