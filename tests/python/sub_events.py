"""A dgbit-style event subscriber, as dgbit's Python services write one.

usage: sub_events.py ADDRESS [PREFIX]

Dials ADDRESS with a pynng Sub0 socket subscribed to the byte prefix PREFIX
(default: every event) and builds dgbit's `Event(**json)` from each message.
Prints one JSON line per message: {"event_type", "keys", "data"} when it
parsed, {"error", "body"} when it did not. Exits 0 after an event whose data
has "stop": true; exits 2 when nothing arrives for 30 s.
"""

import json
import sys
from dataclasses import dataclass
from datetime import datetime
from typing import Optional

import pynng


@dataclass
class Event:
    """The fields of dgbit's Event: any other key is a TypeError."""

    event_type: str
    data: dict
    timestamp: str
    source: str
    correlation_id: Optional[str] = None


def describe(body: bytes) -> dict:
    try:
        obj = json.loads(body)
        event = Event(**obj)
        datetime.fromisoformat(event.timestamp)
    except (ValueError, TypeError) as err:
        return {"error": str(err), "body": body.decode("utf-8", "replace")}
    return {"event_type": event.event_type, "keys": list(obj), "data": event.data}


def main() -> int:
    address = sys.argv[1]
    prefix = sys.argv[2].encode() if len(sys.argv) > 2 else b""
    with pynng.Sub0(recv_timeout=30_000) as sock:
        sock.subscribe(prefix)
        sock.dial(address, block=False)
        while True:
            try:
                body = sock.recv()
            except pynng.Timeout:
                print(json.dumps({"error": "no event within 30 s"}), flush=True)
                return 2
            line = describe(body)
            print(json.dumps(line), flush=True)
            if line.get("data", {}).get("stop") is True:
                return 0


if __name__ == "__main__":
    sys.exit(main())
