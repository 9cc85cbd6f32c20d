"""The command-line parser of the entry scripts and tools."""

from __future__ import annotations

import argparse


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are one line: the problem and where the flags are
    listed. argparse prints the whole usage first, which for the training scripts is over a
    hundred lines that push the one line that matters off the screen."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
