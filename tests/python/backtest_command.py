#!/usr/bin/env python3
"""Send dgbit's backtest command, as dgbit's API does, and print the reply.

usage: backtest_command.py COMMAND_ADDRESS JOB_UUID

Sends `{"job_uuid": JOB_UUID, "payload": {"symbol": "EURUSD", "interval":
"60", "limit": 1000}}` with no `command` over a pynng Req0 socket and prints
the reply as one JSON line.
"""

import json
import sys

import pynng


def main() -> int:
    address, job_uuid = sys.argv[1], sys.argv[2]
    request = {
        "job_uuid": job_uuid,
        "payload": {"symbol": "EURUSD", "interval": "60", "limit": 1000},
    }
    with pynng.Req0(dial=address, recv_timeout=30_000, send_timeout=30_000) as sock:
        sock.send(json.dumps(request).encode())
        print(json.dumps(json.loads(sock.recv())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
