#!/usr/bin/env python3
"""Plan-driven HTTPS client for the AegisPlane integration tests (stdlib http.client).

Usage: py_client.py --port P (--plan FILE | --plan-json JSON) [--host 127.0.0.1] [--print-body]

A plan is either a list of requests, sent in order over ONE keep-alive connection, or
{"connections": [[req, ...], [req, ...], ...]}: one thread per inner list, each thread with
its own keep-alive connection (all started together). A request is
{"method": "POST", "path": "/v1/chat/completions", "headers": {...}, "body": <JSON or string>}.
A JSON body is serialised compactly (json.dumps(..., separators=(",", ":"))) and sent with
Content-Length and Content-Type: application/json unless headers say otherwise.

For every response one JSON line is printed on stdout:
{"conn": C, "i": I, "status": S, "bytes": N, "content_encoding": ..., "tid": T, "server": ...}
where "server" is the mock's x-mock-server header (mock_provider.py --name) and N is the number of body bytes read off the wire (not decompressed); bodies are read
completely, streams included. Exits non-zero if any request fails.
"""

import argparse
import http.client
import json
import ssl
import sys
import threading


def encode_body(req):
    body = req.get("body")
    if body is None:
        return None
    if isinstance(body, str):
        return body.encode()
    return json.dumps(body, separators=(",", ":")).encode()


def run_connection(conn_index, host, port, requests, out, lock, print_body, errors):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=60)
    try:
        for i, req in enumerate(requests):
            body = encode_body(req)
            headers = dict(req.get("headers") or {})
            if body is not None and not any(k.lower() == "content-type" for k in headers):
                headers["Content-Type"] = "application/json"
            conn.request(req.get("method", "GET"), req["path"], body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()  # whole body: Content-Length or all chunks
            line = {"conn": conn_index, "i": i, "status": resp.status, "bytes": len(data),
                    "content_encoding": resp.getheader("Content-Encoding"),
                    "tid": threading.get_native_id(), "server": resp.getheader("x-mock-server")}
            if print_body:
                line["body"] = data.decode("utf-8", "replace")
            with lock:
                out.write(json.dumps(line) + "\n")
                out.flush()
    except Exception as exc:  # reported, and the exit status says so
        errors.append("connection %d: %r" % (conn_index, exc))
    finally:
        conn.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--plan", help="plan file")
    ap.add_argument("--plan-json", help="plan as a JSON string")
    ap.add_argument("--print-body", action="store_true")
    args = ap.parse_args()
    if args.plan:
        with open(args.plan) as f:
            plan = json.load(f)
    elif args.plan_json:
        plan = json.loads(args.plan_json)
    else:
        ap.error("--plan or --plan-json is required")

    connections = plan["connections"] if isinstance(plan, dict) else [plan]
    lock, errors = threading.Lock(), []
    threads = [threading.Thread(target=run_connection,
                                args=(c, args.host, args.port, reqs, sys.stdout, lock,
                                      args.print_body, errors))
               for c, reqs in enumerate(connections)]
    if len(threads) == 1:
        threads[0].run()  # on the main thread: tid == pid
    else:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for e in errors:
        sys.stderr.write("py_client: %s\n" % e)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
