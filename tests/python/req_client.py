"""A dgbit-style REQ client: sends each case to the command bus and prints
one JSON line per reply, {"case": name, "reply": <decoded reply>}.

Usage: req_client.py ADDRESS
"""
import json
import sys

import pynng

CASES = [
    ("with_command", json.dumps({"command": "ping", "job_uuid": "550e8400-e29b-41d4-a716-446655440000"}).encode()),
    ("without_command", json.dumps({"job_uuid": "job-default", "payload": {"symbol": "EURUSD", "interval": "60", "limit": 1000}}).encode()),
    ("request_id_only", json.dumps({"command": "ping", "request_id": "req-7", "source": "api", "priority": 2}).encode()),
    ("not_json", b"{not json"),
    ("not_utf8", b"\xff\xfe\xfd"),
    ("not_an_object", b"[1, 2, 3]"),
    ("wrong_type", json.dumps({"command": 42, "job_uuid": "bad-type"}).encode()),
    ("unknown_command", json.dumps({"command": "no_such_command", "request_id": "u-1"}).encode()),
    ("one_mib_payload", json.dumps({"command": "echo", "job_uuid": "big", "payload": {"blob": "x" * (1024 * 1024)}}).encode()),
    ("after_all_that", json.dumps({"command": "ping", "request_id": "last"}).encode()),
]


def main() -> None:
    address = sys.argv[1]
    with pynng.Req0(dial=address, recv_timeout=10000, send_timeout=10000) as sock:
        for name, body in CASES:
            sock.send(body)
            reply = json.loads(sock.recv().decode("utf-8"))
            if name == "one_mib_payload" and reply.get("status") == "ok":
                reply["result"] = {"blob_length": len(reply["result"]["echo"]["blob"])}
            print(json.dumps({"case": name, "reply": reply}), flush=True)


if __name__ == "__main__":
    main()
