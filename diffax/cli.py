"""What train.py and sample.py share: bad input ends with one line naming the problem, not a traceback."""
from __future__ import annotations

import sys
from typing import Callable, Sequence


def run_reporting_errors(main: Callable[[Sequence[str]], None]) -> Callable[[Sequence[str]], None]:
    """Wrap an absl `main` so ValueError / FileNotFoundError (bad config, missing checkpoint, bad label)
    exit with status 1 and the message alone."""
    def run(argv: Sequence[str]) -> None:
        try:
            main(argv)
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
    return run
