#!/usr/bin/env python3
"""TLS server for the content-gate tests (stdlib only): it counts the application bytes
each connection delivers, so a test can prove that a refused request sent none.

Usage: gate_server.py --cert CERT --key KEY [--port 0]
Prints ``LISTENING <port>`` on stdout once it accepts connections, then one JSON line per
connection when that connection ends:

  {"peer": "127.0.0.1:PORT", "bytes": N, "requests": R, "end": "eof" | "reset" | "..."}

``bytes`` counts decrypted application bytes (the TLS handshake is not counted); ``end``
says how the connection ended: "eof" (the client's FIN), "reset" (a RST: told apart by the
TCP state, as Python's ssl reports both as EOF), "handshake: ..." (the handshake failed),
else the error. Each complete HTTP/1.1 request (headers, then
Content-Length or chunked body) gets a small JSON reply; anything else is just counted.
Both the reply and the per-connection report are flushed at once; TCP_NODELAY is set.
"""

import argparse
import json
import socket
import ssl
import sys
import threading

REPLY = b'{"ok":true}'
LOCK = threading.Lock()


def report(peer, total, requests, end):
    line = json.dumps({"peer": "%s:%d" % peer[:2], "bytes": total, "requests": requests, "end": end})
    with LOCK:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def tcp_end(sock):
    """How the peer ended: "eof" (its FIN: CLOSE_WAIT) or "reset" (RST: CLOSE)."""
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except OSError:
        return "eof"
    return {8: "eof", 7: "reset"}.get(state, "eof (tcp state %d)" % state)


def complete_request(buf):
    """Length of the first complete request in buf, or 0."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return 0
    start = head_end + 4
    length = 0
    chunked = False
    for line in buf[:head_end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if not chunked:
        return start + length if len(buf) >= start + length else 0
    at = start
    while True:
        eol = buf.find(b"\r\n", at)
        if eol < 0:
            return 0
        size = int(buf[at:eol].split(b";")[0], 16)
        at = eol + 2 + size + 2
        if len(buf) < at:
            return 0
        if size == 0:
            return at


def serve(conn, peer, ctx):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    total, requests, end = 0, 0, "eof"
    try:
        tls = ctx.wrap_socket(conn, server_side=True)
    except (OSError, ssl.SSLError) as exc:
        report(peer, 0, 0, "handshake: %r" % exc)
        conn.close()
        return
    buf = b""
    try:
        while True:
            data = tls.recv(65536)
            if not data:
                break
            total += len(data)
            buf += data
            while True:
                n = complete_request(buf)
                if not n:
                    break
                buf = buf[n:]
                requests += 1
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(REPLY), REPLY))
    except ConnectionResetError:
        end = "reset"
    except (OSError, ssl.SSLError) as exc:
        end = "error: %r" % exc
    finally:
        # Python's ssl reports a reset as an EOF; the TCP state tells them apart.
        if end == "eof":
            end = tcp_end(tls)
        report(peer, total, requests, end)
        try:
            tls.close()
        except OSError:
            pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen(64)
    print("LISTENING %d" % listener.getsockname()[1], flush=True)
    while True:
        conn, peer = listener.accept()
        threading.Thread(target=serve, args=(conn, peer, ctx), daemon=True).start()


if __name__ == "__main__":
    main()
