#!/usr/bin/env python3
"""Keep-alive HTTPS client paced by stdin, for the containment tests (stdlib http.client).

Usage: py_keepalive.py --port P --request-json JSON [--host 127.0.0.1]

It opens ONE connection at start and then reads commands, one per line, on stdin:

  call        send the request (JSON: {"method", "path", "headers", "body"}) on the current
              connection; never reconnects by itself (http.client's auto_open is off), so
              a call after the connection died fails instead of silently opening another
  reconnect   close the current connection and open a new one
  quit        exit 0

After each command (and after the initial connect, op "connect") it prints one JSON line:
{"op": "connect"|"call"|"reconnect", "ok": true, "sport": <local port>, "status": S, "bytes": N}
or, on failure, {"op": ..., "ok": false, "error": "<repr>", "errno": <errno or null>,
"sport": <local port of the connection it used, or null>}. It keeps going after a failure.
"""

import argparse
import http.client
import json
import ssl
import sys


def errno_of(exc):
    for e in (exc, getattr(exc, "__cause__", None), getattr(exc, "__context__", None)):
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno
    return None


class Client:
    def __init__(self, host, port):
        self.host, self.port = host, port
        self.ctx = ssl.create_default_context()
        self.ctx.check_hostname = False
        self.ctx.verify_mode = ssl.CERT_NONE
        self.conn = None
        self.sport = None

    def connect(self):
        if self.conn is not None:
            self.conn.close()
        self.sport = None
        self.conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=30)
        self.conn.connect()
        self.conn.auto_open = 0
        self.sport = self.conn.sock.getsockname()[1]

    def call(self, req):
        body = req.get("body")
        if body is not None and not isinstance(body, str):
            body = json.dumps(body, separators=(",", ":"))
        headers = dict(req.get("headers") or {})
        if body is not None and not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = "application/json"
        self.conn.request(req.get("method", "POST"), req["path"], body=body, headers=headers)
        resp = self.conn.getresponse()
        data = resp.read()
        return {"status": resp.status, "bytes": len(data)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--request-json", required=True)
    args = ap.parse_args()
    req = json.loads(args.request_json)
    client = Client(args.host, args.port)

    def report(op, fn):
        line = {"op": op}
        try:
            line.update(fn() or {})
            line["ok"] = True
        except Exception as exc:  # reported; the test decides what it means
            line.update(ok=False, error=repr(exc), errno=errno_of(exc))
        line["sport"] = client.sport
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()

    report("connect", client.connect)
    for cmd in sys.stdin:
        cmd = cmd.strip()
        if cmd == "call":
            report("call", lambda: client.call(req))
        elif cmd == "reconnect":
            report("reconnect", client.connect)
        elif cmd == "quit":
            break
        elif cmd:
            sys.stdout.write(json.dumps({"op": cmd, "ok": False, "error": "unknown command"}) + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
