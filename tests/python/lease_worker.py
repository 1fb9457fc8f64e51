#!/usr/bin/env python3
"""A dgbit-bus leasing worker in plain Python (pynng Req0).

It follows the outcome-report protocol documented in src/worker.rs, so it is
both an interop test and a worked example for dgbit's Python side:

1. ask for one job with `bus.lease` (only when it has a free slot);
2. report `started`, then a `heartbeat` every lease_ms / 3 while it works;
3. report `completed` with a result, or `failed` with an error.

The "work" is sleeping `--delay` seconds; a job whose payload has
`"fail": true` fails. Each accepted completion prints `completed <job_id>`
on stdout (flushed), so a test can reconcile what ran where.
"""

import argparse
import json
import sys
import time
import uuid

import pynng


def call(sock, command, payload):
    """One request/reply on the command bus; raises on an error reply."""
    request = {"command": command, "payload": payload, "request_id": str(uuid.uuid4())}
    sock.send(json.dumps(request).encode())
    reply = json.loads(sock.recv())
    if reply.get("status") != "ok":
        raise RuntimeError(f"{reply.get('code')}: {reply.get('error')}")
    return reply["result"]


def report(sock, worker, job_id, lease_id, state, **fields):
    payload = {"worker": worker, "job_id": job_id, "lease_id": lease_id, "state": state}
    payload.update(fields)
    return call(sock, "bus.report", payload).get("accepted", False)


def work(sock, args, lease):
    job = lease["job"]
    job_id, lease_id = job["job_id"], lease.get("lease_id")
    beat = lease["lease_ms"] / 3000.0
    if not report(sock, args.worker_id, job_id, lease_id, "started"):
        return
    deadline = time.monotonic() + args.delay
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(left, beat))
        if time.monotonic() < deadline:
            report(sock, args.worker_id, job_id, lease_id, "heartbeat")
    if job["payload"].get("fail"):
        report(sock, args.worker_id, job_id, lease_id, "failed", error="the payload asked to fail")
        return
    result = {"worker": args.worker_id, "retry_count": job["retry_count"]}
    if report(sock, args.worker_id, job_id, lease_id, "completed", result=result):
        print(f"completed {job_id}", flush=True)
    else:
        print(f"ignored {job_id}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="the bus's command address")
    parser.add_argument("--worker-id", default=f"py-{uuid.uuid4().hex[:8]}")
    parser.add_argument("--delay", type=float, default=0.01, help="seconds per job")
    parser.add_argument("--job-type", action="append", default=[], help="repeatable; default any")
    parser.add_argument("--wait-ms", type=int, default=1000)
    parser.add_argument("--exit-when-idle", action="store_true",
                        help="stop after a lease request that found no job")
    args = parser.parse_args()

    with pynng.Req0(dial=args.address, recv_timeout=30000, send_timeout=30000) as sock:
        print(f"ready {args.worker_id}", flush=True)
        while True:
            payload = {"worker": args.worker_id, "wait_ms": args.wait_ms}
            if args.job_type:
                payload["job_types"] = args.job_type
            lease = call(sock, "bus.lease", payload)
            if lease.get("job") is None:
                if args.exit_when_idle:
                    return 0
                continue
            work(sock, args, lease)


if __name__ == "__main__":
    sys.exit(main())
