#!/usr/bin/env python3
"""A plain PULL worker, like dgbit's Python job worker: it takes 7-key jobs
from the job queue socket and reports nothing (the bus's at-most-once mode).

Prints `job <job_id> <job_type>` per job received (flushed). `--listen`
makes it listen, as dgbit's own worker does; by default it dials the bus.
Exits after `--count` jobs.
"""

import argparse
import json
import sys

import pynng

KEYS = {"job_id", "job_type", "payload", "priority", "created_at", "retry_count", "max_retries"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--listen", action="store_true")
    parser.add_argument("--count", type=int, default=1)
    args = parser.parse_args()

    endpoint = {"listen": args.address} if args.listen else {"dial": args.address}
    with pynng.Pull0(recv_timeout=30000, **endpoint) as sock:
        print("ready", flush=True)
        for _ in range(args.count):
            job = json.loads(sock.recv())
            if set(job) != KEYS:
                print(f"bad-keys {sorted(job)}", flush=True)
                return 1
            print(f"job {job['job_id']} {job['job_type']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
