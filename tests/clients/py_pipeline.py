#!/usr/bin/env python3
"""HTTP/1.1 pipelining client for the AegisPlane load test (stdlib ssl, raw sockets).

Usage: py_pipeline.py --port P --connections C --depth D --prefix NAME

Opens C TLS connections to 127.0.0.1:P one after the other; on each, writes D chat
requests (model "<prefix>-<c>-<i>") in ONE write, then reads the D responses in order
(Content-Length or chunked bodies). Prints one JSON line per response:
{"conn": c, "i": i, "status": S, "bytes": N, "model": M} where M is the model the answer
names, and exits non-zero when a response is missing or answers another request.
"""

import argparse
import json
import socket
import ssl
import sys


def read_line(f):
    line = f.readline(65537)
    if not line.endswith(b"\n"):
        raise EOFError("connection closed inside a head")
    return line


def read_response(f):
    status = int(read_line(f).split(b" ", 2)[1])
    headers = {}
    while True:
        line = read_line(f).rstrip(b"\r\n")
        if not line:
            break
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding", b"").lower().endswith(b"chunked"):
        body = b""
        while True:
            size = int(read_line(f).split(b";")[0], 16)
            if size == 0:
                while read_line(f) not in (b"\r\n", b"\n"):
                    pass
                break
            body += f.read(size)
            read_line(f)
    else:
        body = f.read(int(headers.get(b"content-length", b"0")))
    return status, body


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--connections", type=int, required=True)
    ap.add_argument("--depth", type=int, required=True)
    ap.add_argument("--prefix", required=True)
    args = ap.parse_args()
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    failures = 0
    for c in range(args.connections):
        raw = socket.create_connection(("127.0.0.1", args.port), timeout=60)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            out = b""
            for i in range(args.depth):
                body = json.dumps({"model": "%s-%d-%d" % (args.prefix, c, i),
                                   "messages": [{"role": "user", "content": "pipelined call %d %d" % (c, i)}]},
                                  separators=(",", ":")).encode()
                out += (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (args.port, len(body))) + body
            s.sendall(out)
            f = s.makefile("rb")
            for i in range(args.depth):
                status, body = read_response(f)
                model = json.loads(body).get("model")
                expected = "%s-%d-%d" % (args.prefix, c, i)
                if model != expected:
                    failures += 1
                    sys.stderr.write("py_pipeline: connection %d answer %d names %r\n" % (c, i, model))
                print(json.dumps({"conn": c, "i": i, "status": status, "bytes": len(body), "model": model}),
                      flush=True)
            f.close()
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
