"""A real process that asks the workspace's scheduler for a gang, holds it, and gives it back.

`python gang_holder.py WORKSPACE NAME [--workers N] [--queue Q] [--priority P] [--repeat K]
[--hold SECONDS | --until FILE]` prints `admitted NAME JOB_ID` each time its gang starts. With
`--until`, each gang is held until FILE exists; `{index}` in FILE stands for the repeat's number
(0, 1, ...), so a test can release the jobs of one holder one at a time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from distml.scheduling.admission import Resources, SharedPool
from distml.workspace import Workspace


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workspace")
    parser.add_argument("name")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--queue", default="default")
    parser.add_argument("--priority", default="normal")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--hold", type=float, default=0.0)
    parser.add_argument("--until", default=None)
    args = parser.parse_args()
    pool = SharedPool(Workspace(args.workspace).engine, queue=args.queue, priority=args.priority)
    try:
        for index in range(args.repeat):
            lease = pool.acquire(f"{args.name}-{index}", Resources(cpus=1, workers=args.workers))
            print(f"admitted {args.name} {lease.id}", flush=True)
            if args.until:
                until = Path(args.until.replace("{index}", str(index)))
                while not until.exists():
                    time.sleep(0.05)
            else:
                time.sleep(args.hold)
            pool.release(lease)
    finally:
        pool.close()


if __name__ == "__main__":
    main()
