"""One ClientApp task in its own process: the site agent's ``subprocess`` executor.

Stock Flower starts a ``flwr-clientapp`` process per message, which loads the app named by
the run's bundle. This entry point is what the site agent starts instead: it runs the same
steps as the warm executor (pull the task, refuse any bundle that is not the appliance's
own, call the relay, push the reply), so sites run only installed code in this mode too.
The task token is read from stdin.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from fedward.flower.executor import PULL_MAX_TIME_S
from site_agent import clientapp
from site_agent.warm_executor import WarmExecutor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m site_agent.task_process")
    parser.add_argument("--runtime", required=True,
                        help="the SuperNode's runtime API: unix:/PATH or 127.0.0.1:PORT")
    parser.add_argument("--content-wait", type=float, default=PULL_MAX_TIME_S,
                        help="seconds the task waits for its message's content")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    token = sys.stdin.read().strip()
    if not token:
        print("no task token on stdin", file=sys.stderr)
        return 2
    executor = WarmExecutor(runtime_address=args.runtime, app=clientapp.app,
                            content_wait_s=args.content_wait)
    executor.execute(token)
    logging.getLogger("fedward.site.executor").info("task run in its own process (pid %s)",
                                                    os.getpid())
    return 0


if __name__ == "__main__":
    sys.exit(main())
