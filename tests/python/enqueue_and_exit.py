#!/usr/bin/env python3
"""A producer that enqueues jobs with `bus.enqueue` and exits at once.

Each reply's result is printed as one JSON line ({"job_id", "queue_depth"}).
"""

import argparse
import json
import sys

import pynng


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--job-type", default="t")
    args = parser.parse_args()
    with pynng.Req0(dial=args.address, recv_timeout=10000, send_timeout=10000) as sock:
        for n in range(args.count):
            request = {"command": "bus.enqueue",
                       "payload": {"job_type": args.job_type, "payload": {"n": n}}}
            sock.send(json.dumps(request).encode())
            reply = json.loads(sock.recv())
            if reply.get("status") != "ok":
                print(json.dumps(reply), file=sys.stderr)
                return 1
            print(json.dumps(reply["result"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
