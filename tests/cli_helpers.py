"""Run the ``lightning-mtp`` command in this process and keep what a user would read of its failure."""

from __future__ import annotations

import contextlib
import io
import warnings

from lightning_mtp.cli import main


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``(exit code, stderr)`` of ``lightning-mtp ARGV``, stderr without the warnings that libraries print there
    (the command's own report is what counts: one line, no traceback)."""
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    lines = [line for line in err.getvalue().splitlines() if line.strip() and not _progress(line)]
    return code, "\n".join(lines)


def _progress(line: str) -> bool:
    """A progress bar (tqdm, as transformers shows while loading weights), not a message."""
    return "it/s]" in line or "\r" in line
