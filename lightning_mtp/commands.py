"""What every ``lightning-mtp`` subcommand parses its arguments with (a leaf: faces import it, it imports nothing
of the package)."""

from __future__ import annotations

import argparse

__all__ = ["CommandParser"]


class CommandParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors raise instead of printing the usage and exiting, so that
    :func:`lightning_mtp.cli.main` reports them as one line like every other bad input."""

    def error(self, message: str):
        raise argparse.ArgumentError(None, message)
