"""``atmask train`` with a fault injected through the loop's hooks, for tests that need a real process.

    python tests/fault_train.py --kill-after N -- train --config ... (the usual ``atmask train`` arguments)

sends SIGKILL to itself right after iteration N (as an OOM killer or a lost node would).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from components import train
from components.train_loop import LoopHooks


def main() -> int:
    outer = argparse.ArgumentParser()
    outer.add_argument("--kill-after", type=int, required=True)
    outer.add_argument("rest", nargs=argparse.REMAINDER)
    opts = outer.parse_args()
    argv = [a for a in opts.rest if a != "--"][1:]  # drop "train"
    parser = argparse.ArgumentParser(prog="atmask train")
    train.add_arguments(parser)

    def kill(iteration: int) -> None:
        if iteration == opts.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    return train.run(parser.parse_args(argv), hooks=LoopHooks(after_iteration=kill))


if __name__ == "__main__":
    sys.exit(main())
