#!/usr/bin/env python3
"""The "what users have today" baseline for the benchmark: a REP server in
the shape of dgbit's Python NNGWorker. One pynng Rep0 socket and a loop:
receive, json.loads, build the reply dict, json.dumps, send. The reply has
the bus's shape, {"status": "ok", "job_uuid": ..., "result": ...}, with the
request's payload as the result (what the bench's echo handler answers).

Prints "ready" once listening. Runs until killed, or until --seconds pass.
`--blocking` uses pynng's blocking recv/send instead of dgbit's asyncio
arecv/asend.
"""

import argparse
import asyncio
import json
import sys
import time

import pynng


def reply_to(body):
    request = json.loads(body)
    echo = request.get("job_uuid") or request.get("request_id")
    reply = {"status": "ok", "job_uuid": echo, "result": request.get("payload", {})}
    if request.get("request_id") is not None:
        reply["request_id"] = request["request_id"]
    return json.dumps(reply).encode("utf-8")


async def serve_async(sock, deadline):
    while time.monotonic() < deadline:
        body = await sock.arecv()
        await sock.asend(reply_to(body))


def serve_blocking(sock, deadline):
    while time.monotonic() < deadline:
        body = sock.recv()
        sock.send(reply_to(body))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--blocking", action="store_true")
    args = parser.parse_args()

    deadline = time.monotonic() + args.seconds
    with pynng.Rep0(listen=args.address) as sock:
        print("ready", flush=True)
        if args.blocking:
            serve_blocking(sock, deadline)
        else:
            asyncio.run(serve_async(sock, deadline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
