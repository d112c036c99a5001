"""``ArgumentParser``: the flag parser of resflax's commands, whose errors are ``BadInput`` (one line on stderr
and exit code 2 through ``resflax.cli.main``) instead of argparse's usage dump and ``SystemExit``."""

from __future__ import annotations

import argparse

from resflax.errors import BadInput


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit 2 through ``main`` (``BadInput``), not a usage dump."""

    def error(self, message: str):
        raise BadInput(f"{self.prog}: {message}")
