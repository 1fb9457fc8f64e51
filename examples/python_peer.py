#!/usr/bin/env python3
"""A Python peer of a running dgbit-bus: pynng and dgbit's message shapes.

Run it against a bus that serves `run_backtest` and the data service, such as
the quick start's long-running mode:

    terminal 1:  ./scripts/quickstart.sh --serve     (prints the addresses)
    terminal 2:  export NNG_COMMAND_ADDRESS=... NNG_EVENT_ADDRESS=... NNG_DATA_ADDRESS=...
                 python3 examples/python_peer.py

What it does, each step as dgbit's Python services do it:

1. subscribes to job events with a Sub0 socket and the byte prefix
   `{"event_type":"job.` (the bus writes events compactly, `event_type`
   first, so NNG itself filters them), and reads each into dgbit's `Event`;
2. sends a backtest to the command bus with no `command`, as dgbit's API
   dispatches backtests: `{"job_uuid", "payload": {"symbol": "EURUSD",
   "interval": "60", "limit": 1000}}`, and prints the figures of the reply;
3. enqueues one `run_backtest` job (for the bus's own workers) and three
   `kline_stats` jobs (for itself) with the `bus.enqueue` command;
4. works as a leasing worker for `kline_stats`, with the lease/report
   protocol of src/worker.rs: `bus.lease`, report `started`, fetch the bars
   from the data bus (`GET_KLINES`), report `progress`, then `completed`
   with the figures (each job takes milliseconds, far less than a third of
   the lease, so it needs no heartbeat);
5. prints the job events of its four jobs until each has completed.

Addresses come from NNG_COMMAND_ADDRESS, NNG_EVENT_ADDRESS and
NNG_DATA_ADDRESS (dgbit's defaults when unset) or the flags. `--json`
prints one JSON object per line instead of text, for tests. Exits 0 when
every step worked, 1 with a message on stderr otherwise.
"""

import argparse
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Optional

import pynng

JOB_EVENTS_PREFIX = b'{"event_type":"job.'
KLINE_STATS = "kline_stats"
REQUEST_TIMEOUT_MS = 30_000
EVENTS_LIMIT_S = 30.0
WORK_LIMIT_S = 30.0


@dataclass
class Event:
    """dgbit's event: any key besides these is a TypeError, as in dgbit."""

    event_type: str
    data: dict
    timestamp: str
    source: str
    correlation_id: Optional[str] = None


class BusError(Exception):
    """The bus answered with an error reply."""


class Output:
    """Text for people, or one JSON object per line for tests."""

    def __init__(self, as_json):
        self.as_json = as_json

    def say(self, text, **record):
        if self.as_json:
            if record:
                print(json.dumps(record), flush=True)
        else:
            print(text, flush=True)


def request(sock, body):
    sock.send(json.dumps(body).encode())
    return json.loads(sock.recv())


def call(sock, command, payload):
    """One command; its result, or BusError for an error reply."""
    reply = request(sock, {"command": command, "payload": payload, "request_id": str(uuid.uuid4())})
    if reply.get("status") != "ok":
        raise BusError(f"{command}: {reply.get('code')}: {reply.get('error')}")
    return reply["result"]


def backtest_by_command(cmd, out):
    """Step 2: a backtest with no `command`, shaped as dgbit's API sends it."""
    job_uuid = str(uuid.uuid4())
    reply = request(cmd, {"job_uuid": job_uuid,
                          "payload": {"symbol": "EURUSD", "interval": "60", "limit": 1000}})
    if reply.get("status") != "ok":
        raise BusError(f"backtest: {reply.get('code')}: {reply.get('error')}")
    if reply.get("job_uuid") != job_uuid:
        raise BusError(f"backtest: the reply echoed {reply.get('job_uuid')!r}, not {job_uuid}")
    result = reply["result"]
    out.say("backtest via the command bus (no `command`): status ok, job_uuid echoed", step="command",
            reply=reply)
    out.say(f"  {result['symbol']} {result['interval']}, {result['bars']} bars, SMA "
            f"{result['strategy']['fast']}/{result['strategy']['slow']}: "
            f"{result['total_trades']} trades, win rate {result['win_rate']:.1%}, "
            f"net return {result['net_return']:+.2%}, max drawdown {result['max_drawdown']:.1%}")


def enqueue_jobs(cmd, out):
    """Step 3: one backtest for the Rust workers, three kline_stats for us."""
    backtest = call(cmd, "bus.enqueue", {
        "job_type": "run_backtest",
        "payload": {"symbol": "BTCUSD", "interval": "M", "fast": 6, "slow": 12},
    })["job_id"]
    windows = [("EURUSD", "60", 500), ("EURUSD", "60", 5000), ("BTCUSD", "M", 24)]
    stats = []
    for symbol, interval, limit in windows:
        payload = {"symbol": symbol, "interval": interval, "limit": limit}
        stats.append(call(cmd, "bus.enqueue", {"job_type": KLINE_STATS, "payload": payload})["job_id"])
    out.say(f"enqueued run_backtest {backtest} (for the bus's workers) and "
            f"{len(stats)} {KLINE_STATS} jobs (for this peer)",
            step="enqueued", run_backtest=backtest, kline_stats=stats)
    return backtest, stats


def kline_stats(data, payload):
    """Figures of the most recent `limit` bars, fetched from the data bus."""
    bars = call(data, "GET_KLINES", payload)
    if not bars:
        raise BusError(f"no bars for {payload}")
    closes = [bar["close"] for bar in bars]
    return {
        "symbol": payload["symbol"], "interval": payload["interval"], "bars": len(bars),
        "first_time": bars[0]["time"], "last_time": bars[-1]["time"],
        "first_close": closes[0], "last_close": closes[-1],
        "change": closes[-1] / closes[0] - 1,
        "high": max(bar["high"] for bar in bars), "low": min(bar["low"] for bar in bars),
        "mean_close": sum(closes) / len(closes),
    }


def report(cmd, worker, lease, state, **fields):
    payload = {"worker": worker, "job_id": lease["job"]["job_id"],
               "lease_id": lease.get("lease_id"), "state": state}
    payload.update(fields)
    return call(cmd, "bus.report", payload).get("accepted", False)


def work(cmd, data, worker, mine, out, on_idle):
    """Step 4: lease and run kline_stats jobs until ours are all done."""
    done = set()
    deadline = time.monotonic() + WORK_LIMIT_S
    while not mine <= done:
        if time.monotonic() > deadline:
            raise BusError(f"{len(mine - done)} {KLINE_STATS} jobs not leased within {WORK_LIMIT_S} s")
        lease = call(cmd, "bus.lease", {"worker": worker, "job_types": [KLINE_STATS], "wait_ms": 500})
        on_idle()
        job = lease.get("job")
        if job is None:
            continue
        if not report(cmd, worker, lease, "started"):
            continue
        try:
            stats = kline_stats(data, job["payload"])
        except (BusError, KeyError, ZeroDivisionError) as err:
            report(cmd, worker, lease, "failed", error=str(err))
            continue
        report(cmd, worker, lease, "progress", progress={"bars_fetched": stats["bars"]})
        if report(cmd, worker, lease, "completed", result=stats):
            done.add(job["job_id"])
            out.say(f"worker {worker}: {KLINE_STATS} {stats['symbol']} {stats['interval']} "
                    f"last {stats['bars']} bars ({stats['first_time']} .. {stats['last_time']}): "
                    f"close {stats['first_close']} -> {stats['last_close']} ({stats['change']:+.2%}), "
                    f"high {stats['high']}, low {stats['low']}",
                    step="worked", job_id=job["job_id"], result=stats)


class JobEvents:
    """Step 1 and 5: the job events of our jobs, from a Sub0 socket."""

    def __init__(self, address, out):
        self.sock = pynng.Sub0(recv_timeout=200)
        self.sock.subscribe(JOB_EVENTS_PREFIX)
        self.sock.dial(address)
        self.out = out
        self.watched = set()
        self.completed = set()

    def watch(self, job_ids):
        """Show the events of these jobs; the socket holds them until read."""
        self.watched.update(job_ids)

    def drain(self):
        """Take what has arrived, without waiting."""
        while True:
            try:
                body = self.sock.recv(block=False)
            except pynng.TryAgain:
                return
            self.take(body)

    def until_all_completed(self):
        deadline = time.monotonic() + EVENTS_LIMIT_S
        while not self.watched <= self.completed:
            if time.monotonic() > deadline:
                raise BusError(f"no job.completed for {sorted(self.watched - self.completed)}")
            try:
                self.take(self.sock.recv())
            except pynng.Timeout:
                continue

    def take(self, body):
        event = Event(**json.loads(body))
        data = event.data
        if data.get("job_id") not in self.watched:
            return
        if event.event_type == "job.completed":
            self.completed.add(data["job_id"])
        extra = data.get("worker") or data.get("reason") or ""
        self.out.say(f"  event {event.event_type:<14} {data.get('job_type', ''):<12} "
                     f"{data['job_id'][:8]}  {extra}",
                     step="event", event_type=event.event_type, job_id=data["job_id"],
                     job_type=data.get("job_type"), worker=data.get("worker"))

    def close(self):
        self.sock.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--command", default=os.environ.get("NNG_COMMAND_ADDRESS")
                        or "ipc:///tmp/dgbit_cmd.ipc", help="the command bus address")
    parser.add_argument("--event", default=os.environ.get("NNG_EVENT_ADDRESS")
                        or "ipc:///tmp/dgbit_evt.ipc", help="the event bus address")
    parser.add_argument("--data", default=os.environ.get("NNG_DATA_ADDRESS")
                        or "ipc:///tmp/dgbit_data.ipc", help="the data bus address")
    parser.add_argument("--worker-id", default=f"py-{uuid.uuid4().hex[:8]}")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args()
    out = Output(args.json)

    events = JobEvents(args.event, out)
    out.say(f"subscribed to {JOB_EVENTS_PREFIX.decode()} on {args.event}")
    try:
        with pynng.Req0(dial=args.command, recv_timeout=REQUEST_TIMEOUT_MS,
                        send_timeout=REQUEST_TIMEOUT_MS) as cmd, \
                pynng.Req0(dial=args.data, recv_timeout=REQUEST_TIMEOUT_MS,
                           send_timeout=REQUEST_TIMEOUT_MS) as data:
            backtest_by_command(cmd, out)
            backtest, stats = enqueue_jobs(cmd, out)
            events.watch([backtest, *stats])
            work(cmd, data, args.worker_id, set(stats), out, events.drain)
            events.until_all_completed()
    except (BusError, pynng.NNGException) as err:
        print(f"python_peer: {err}", file=sys.stderr)
        return 1
    finally:
        events.close()
    out.say(f"all {len(events.watched)} jobs completed", step="done",
            completed=sorted(events.completed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
