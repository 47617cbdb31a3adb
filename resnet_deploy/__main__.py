"""The ``resnet-deploy`` script (and ``python -m resnet_deploy``): signals handled from the
first moment.

Importing the command line takes a while (click, every command's module); a Ctrl-C or
SIGTERM in that window would otherwise print a KeyboardInterrupt traceback or kill the
process outright. Until the CLI installs its own handlers, which clean up and say so, a
signal exits with its documented code (130 / 143); nothing has been written yet then.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType


def _early(signum: int, frame: FrameType | None) -> None:
    sys.exit(128 + signum)


def run() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _early)
    from .cli import main

    main()


if __name__ == "__main__":
    run()
