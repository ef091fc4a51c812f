#!/usr/bin/env python3
"""HTTPS client for the content-gate tests (stdlib only): one new TLS connection per
step, so each request's fate can be told apart.

Usage: gate_client.py --port P --steps JSON [--host 127.0.0.1]
JSON is a list of {"name": N, "body": TEXT}. For each step the client connects, prints
{"step": N, "local": "ip:port", "peer": "ip:port"} once the handshake is done, sends
``POST /v1/chat/completions`` with TEXT as body in one write, and prints one of
  {"step": N, "status": S, "bytes": B}                  the reply arrived
  {"step": N, "write_errno": E, "error": R, "read": X, "tcp_state": T}
      the write failed; X says what a TLS read then did (it waits up to 10 s, holding the
      connection open), T is the TCP state after it: CLOSE once the connection was
      aborted or reset, CLOSE_WAIT when the server closed it
Exits 0 unless something unexpected happened (then the traceback is on stderr).
"""

import argparse
import json
import socket
import ssl
import sys


def out(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# include/net/tcp_states.h
TCP_STATES = {1: "ESTABLISHED", 7: "CLOSE", 8: "CLOSE_WAIT"}


def describe_read(read):
    try:
        got = read()
        return "eof" if not got else "data: %d bytes" % len(got)
    except socket.timeout:
        return "timeout"
    except (OSError, ssl.SSLError) as exc:
        return "error: errno %s %r" % (getattr(exc, "errno", None), exc)


def show(addr):
    """ip:port, IPv6 in brackets."""
    return ("[%s]:%d" if ":" in addr[0] else "%s:%d") % addr[:2]


def step(host, port, name, body):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection((host, port), timeout=10)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tls = ctx.wrap_socket(raw, server_hostname="localhost")
    local, peer = tls.getsockname(), tls.getpeername()
    out({"step": name, "local": show(local), "peer": show(peer)})
    data = body.encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
               b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (port, len(data), data))
    try:
        tls.sendall(request)
    except OSError as exc:
        # What the application sees next: a read that waits (up to 10 s, holding the
        # connection open) until something ends the connection; then the TCP state.
        read = describe_read(lambda: tls.recv(4096))
        state = tls.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        out({"step": name, "write_errno": exc.errno, "error": repr(exc), "read": read,
             "tcp_state": TCP_STATES.get(state, str(state))})
        tls.close()
        return
    reply = b""
    while b"\r\n\r\n" not in reply:
        chunk = tls.recv(65536)
        if not chunk:
            break
        reply += chunk
    head, _, rest = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1]) if head else 0
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    while len(rest) < length:
        chunk = tls.recv(65536)
        if not chunk:
            break
        rest += chunk
    out({"step": name, "status": status, "bytes": len(rest)})
    tls.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--steps", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args()
    for s in json.loads(args.steps):
        step(args.host, args.port, s["name"], s["body"])


if __name__ == "__main__":
    main()
