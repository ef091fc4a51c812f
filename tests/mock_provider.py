#!/usr/bin/env python3
"""Local TLS mock model provider for the AegisPlane integration tests (stdlib only).

Usage: mock_provider.py --cert CERT --key KEY [--port 0] [--name NAME] [--verbose]
Prints ``LISTENING <port>`` on stdout once it accepts connections.

Every answer is deterministic so tests can assert exact numbers:

* the reply text is always REPLY (10 words), so output tokens = 10;
* input tokens = ``count_input_words(request_body)``: the number of whitespace-separated
  words in every string found (recursively, through objects and arrays) under the
  top-level keys INPUT_KEYS of the request body, skipping strings whose object key is in
  SKIP_KEYS. ``tests/src/lib.rs::expected_input_tokens`` mirrors this exactly.

Endpoints (POST unless noted):
  /v1/chat/completions            OpenAI chat; SSE when "stream": true, usage chunk only
                                  when stream_options.include_usage
  /v1/completions                 OpenAI legacy completions (same streaming rules)
  /v1/responses                   OpenAI Responses API (SSE events when streaming)
  /v1/embeddings                  usage.prompt_tokens / total_tokens only
  /v1/messages                    Anthropic Messages (SSE events when streaming)
  /v1beta/models/{m}:generateContent, :streamGenerateContent[?alt=sse]   Gemini
  /api/chat, /api/generate        Ollama native; NDJSON stream unless "stream": false
  GET /health, GET /static/blob, POST /api/login   non-LLM traffic
Request header ``x-mock-status: <code>`` makes an LLM endpoint answer that status with an
OpenAI-style error body (no usage). Request header ``x-mock-reply: <text>`` makes
/v1/chat/completions reply <text> instead (output tokens = its words).

Large and odd answers of /v1/chat/completions (for the agent's inspection bounds):
  x-mock-reply-pad: N        N bytes of filler text before the reply (a stream sends them
                             as deltas of 16 KiB before the reply's)
  x-mock-sse-event-bytes: N  a stream sends the filler and the reply in ONE event
  x-mock-content-type: T     the reply as a plain body of type T (not JSON)
  x-mock-break-json: 1       the JSON body without its last byte (its closing brace)
Requests may carry up to 1000 header fields (http.client's default is 100).

Containment tests:
  --name NAME               every response carries ``x-mock-server: NAME`` and chat replies
                            start with "[NAME] " (output tokens + 1), so a fallback server
                            is recognisable. Without --name nothing changes.
  x-mock-delay-ms: N        request header: sleep N ms after reading the request, before
                            answering (lets a verdict win the race deterministically).
  GET /stats                {"requests": N, "by_path": {"<path?query>": n}}: requests whose
                            request line and headers were read, by path with query (GET
                            /stats itself not counted), and "body_bytes_by_path": body bytes
                            read (Content-Length bodies, counted also when cut by a reset).
                            A request stopped before its bytes left the client never appears.

Non-streamed JSON bodies are gzip-compressed when Accept-Encoding mentions gzip; streams
never are. Non-stream bodies use Content-Length, streams use chunked transfer encoding.
"""

import argparse
import gzip
import json
import re
import socket
import ssl
import sys
import threading
import time
import http.client
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Tests send heads with more fields than the stdlib takes by default.
http.client._MAXHEADERS = 1000

REPLY = "This is a mock reply from the AegisPlane test provider."
REPLY_WORDS = REPLY.split()
OUTPUT_TOKENS = len(REPLY_WORDS)  # 10
INPUT_KEYS = ("messages", "prompt", "input", "contents", "system", "instructions")
SKIP_KEYS = ("role", "type")
BLOB = bytes(range(256)) * 80  # 20480 bytes
CREATED = 1764176400
# Pause between stream events so they leave as separate TLS records / reads.
STREAM_PAUSE = 0.002


def _strings(value, key=None):
    if isinstance(value, str):
        if key not in SKIP_KEYS:
            yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item, key)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, k)


def count_input_words(body):
    """Input tokens of a request body (see module docstring)."""
    if not isinstance(body, dict):
        return 0
    return sum(len(s.split()) for k in INPUT_KEYS if k in body for s in _strings(body[k], k))


def filler(n):
    """n bytes of plain words."""
    words = "lorem ipsum dolor sit amet consectetur adipiscing elit "
    return (words * (n // len(words) + 1))[:n]


def reply_deltas(reply=REPLY):
    """The reply split into word-ish deltas: "This", " is", " a", ..."""
    return [w if i == 0 else " " + w for i, w in enumerate(reply.split())]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "AegisMock/1.0"
    sys_version = ""

    # --- connection setup: TLS handshake in the per-connection thread --------------------
    def setup(self):
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request = self.server.ssl_ctx.wrap_socket(self.request, server_side=True)
        super().setup()

    def finish(self):
        try:
            super().finish()
        finally:
            try:
                self.request.close()
            except OSError:
                pass

    # --- containment-test hooks (--name, x-mock-delay-ms, GET /stats) ----------------------
    def parse_request(self):
        ok = super().parse_request()
        if ok and self.path.split("?")[0] != "/stats":
            with self.server.stats_lock:
                self.server.stats[self.path] = self.server.stats.get(self.path, 0) + 1
        return ok

    def send_response(self, code, message=None):
        super().send_response(code, message)
        if self.server.name:
            self.send_header("x-mock-server", self.server.name)

    def delay(self):
        ms = self.headers.get("x-mock-delay-ms")
        if ms:
            time.sleep(int(ms) / 1000.0)

    def log_message(self, fmt, *args):
        if self.server.verbose:
            sys.stderr.write("mock: %s:%d %s\n" % (self.client_address[0], self.client_address[1], fmt % args))

    # --- low-level writers -----------------------------------------------------------------
    def _wants_gzip(self):
        return "gzip" in (self.headers.get("Accept-Encoding") or "").lower()

    def send_body(self, status, body, content_type="application/json", compressible=True):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        gz = compressible and self._wants_gzip()
        if gz:
            body = gzip.compress(body, mtime=0)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if gz:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def start_stream(self, content_type):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def chunk(self, data):
        """One chunked-encoding frame, written (and so flushed) on its own."""
        if isinstance(data, str):
            data = data.encode()
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            time.sleep(STREAM_PAUSE)

    def end_stream(self):
        self.wfile.write(b"0\r\n\r\n")

    def sse(self, obj, event=None, split=False):
        text = ("event: %s\n" % event if event else "") + "data: %s\n\n" % (
            obj if isinstance(obj, str) else json.dumps(obj))
        if split:  # one event across two chunk frames, as real servers sometimes do
            half = len(text) // 2
            self.chunk(text[:half])
            self.chunk(text[half:])
        else:
            self.chunk(text)

    # --- request parsing -----------------------------------------------------------------
    def read_body(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        # Read in pieces, so that body bytes that arrived before a reset are still counted.
        data = b""
        try:
            while len(data) < length:
                piece = self.rfile.read1(length - len(data))
                if not piece:
                    break
                data += piece
        finally:
            with self.server.stats_lock:
                bb = self.server.body_bytes
                bb[self.path] = bb.get(self.path, 0) + len(data)
        return data

    def json_body(self, raw):
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    # --- dispatch ------------------------------------------------------------------------
    def do_GET(self):
        path = self.path.split("?")[0]
        self.delay()
        if path == "/stats":
            with self.server.stats_lock:
                stats = {"requests": sum(self.server.stats.values()), "by_path": dict(self.server.stats),
                         "body_bytes_by_path": dict(self.server.body_bytes)}
            self.send_body(200, stats, compressible=False)
        elif path == "/health":
            self.send_body(200, {"status": "ok"})
        elif path == "/static/blob":
            self.send_body(200, BLOB, "application/octet-stream", compressible=False)
        else:
            self.not_found()

    def do_HEAD(self):
        self.not_found()

    def do_PUT(self):
        self.read_body()
        self.not_found()

    do_DELETE = do_PUT

    def not_found(self):
        self.send_body(404, {"error": {"message": "not found: %s %s" % (self.command, self.path),
                                       "type": "not_found"}})

    def do_POST(self):
        raw = self.read_body()
        self.delay()
        path, _, query = self.path.partition("?")
        if path == "/api/login":
            self.send_body(200, {"ok": True, "session": "mock-session", "user": "tester"})
            return
        body = self.json_body(raw)
        gemini = re.fullmatch(r"/v1beta/models/([^/:]+):(generateContent|streamGenerateContent)", path)
        routes = {
            "/v1/chat/completions": self.chat,
            "/v1/completions": self.completions,
            "/v1/responses": self.openai_responses,
            "/v1/embeddings": self.embeddings,
            "/v1/messages": self.anthropic,
            "/api/chat": self.ollama,
            "/api/generate": self.ollama,
        }
        if not gemini and path not in routes:
            self.not_found()
            return
        if body is None:
            self.send_body(400, {"error": {"message": "invalid JSON body", "type": "invalid_request_error"}})
            return
        status = self.headers.get("x-mock-status")
        if status:
            self.send_body(int(status), {"error": {"message": "mock error", "type": "mock_error",
                                                   "code": int(status)}})
            return
        n_in = count_input_words(body)
        if gemini:
            self.gemini(body, n_in, gemini.group(1), gemini.group(2) == "streamGenerateContent",
                        "alt=sse" in query.split("&"))
        else:
            routes[path](body, n_in)

    # --- OpenAI ---------------------------------------------------------------------------
    def chat(self, body, n_in):
        model = body.get("model", "unknown")
        # Tests of response rules choose the reply; its words are the output tokens.
        reply = self.headers.get("x-mock-reply") or REPLY
        if self.server.name:
            reply = "[%s] %s" % (self.server.name, reply)
        n_out = len(reply.split())
        usage = {"prompt_tokens": n_in, "completion_tokens": n_out,
                 "total_tokens": n_in + n_out}
        pad = int(self.headers.get("x-mock-reply-pad") or 0)
        one_event = int(self.headers.get("x-mock-sse-event-bytes") or 0)
        if not body.get("stream"):
            content = (filler(pad) + " " if pad else "") + reply
            raw_type = self.headers.get("x-mock-content-type")
            if raw_type:
                self.send_body(200, content.encode(), raw_type, compressible=False)
                return
            doc = json.dumps({
                "id": "chatcmpl-mock", "object": "chat.completion", "created": CREATED, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "logprobs": None, "finish_reason": "stop"}],
                "usage": usage, "system_fingerprint": "fp_mock"}).encode()
            if self.headers.get("x-mock-break-json"):
                doc = doc[:-1]
            self.send_body(200, doc)
            return
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk_obj(delta, finish=None):
            obj = {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": CREATED,
                   "model": model, "system_fingerprint": "fp_mock",
                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if include_usage:
                obj["usage"] = None
            return obj

        self.start_stream("text/event-stream")
        self.sse(chunk_obj({"role": "assistant", "content": ""}))
        if one_event:
            self.sse(chunk_obj({"content": filler(one_event) + " " + reply}))
        else:
            text = filler(pad)
            for at in range(0, len(text), 16384):
                self.sse(chunk_obj({"content": text[at:at + 16384]}))
            for i, d in enumerate(reply_deltas(reply)):
                self.sse(chunk_obj({"content": d}), split=(i == 3))
        self.sse(chunk_obj({}, "stop"))
        if include_usage:
            self.sse({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": CREATED,
                      "model": model, "system_fingerprint": "fp_mock", "choices": [], "usage": usage})
        self.sse("[DONE]")
        self.end_stream()

    def completions(self, body, n_in):
        model = body.get("model", "unknown")
        usage = {"prompt_tokens": n_in, "completion_tokens": OUTPUT_TOKENS,
                 "total_tokens": n_in + OUTPUT_TOKENS}
        if not body.get("stream"):
            self.send_body(200, {
                "id": "cmpl-mock", "object": "text_completion", "created": CREATED, "model": model,
                "choices": [{"text": REPLY, "index": 0, "logprobs": None, "finish_reason": "stop"}],
                "usage": usage})
            return
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk_obj(text, finish=None):
            return {"id": "cmpl-mock", "object": "text_completion", "created": CREATED, "model": model,
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

        self.start_stream("text/event-stream")
        for d in reply_deltas():
            self.sse(chunk_obj(d))
        self.sse(chunk_obj("", "stop"))
        if include_usage:
            self.sse({"id": "cmpl-mock", "object": "text_completion", "created": CREATED,
                      "model": model, "choices": [], "usage": usage})
        self.sse("[DONE]")
        self.end_stream()

    def openai_responses(self, body, n_in):
        model = body.get("model", "unknown")
        text_part = {"type": "output_text", "text": REPLY, "annotations": []}
        item = {"id": "msg_mock", "type": "message", "status": "completed", "role": "assistant",
                "content": [text_part]}
        usage = {"input_tokens": n_in, "input_tokens_details": {"cached_tokens": 0},
                 "output_tokens": OUTPUT_TOKENS, "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": n_in + OUTPUT_TOKENS}

        def resp(status, output, usage_):
            return {"id": "resp_mock", "object": "response", "created_at": CREATED, "status": status,
                    "model": model, "output": output, "usage": usage_}

        if not body.get("stream"):
            self.send_body(200, resp("completed", [item], usage))
            return
        seq = iter(range(1000))

        def ev(kind, **fields):
            self.sse(dict(type=kind, sequence_number=next(seq), **fields), event=kind)

        self.start_stream("text/event-stream")
        ev("response.created", response=resp("in_progress", [], None))
        ev("response.in_progress", response=resp("in_progress", [], None))
        ev("response.output_item.added", output_index=0,
           item=dict(item, status="in_progress", content=[]))
        ev("response.content_part.added", item_id="msg_mock", output_index=0, content_index=0,
           part=dict(text_part, text=""))
        for d in reply_deltas():
            ev("response.output_text.delta", item_id="msg_mock", output_index=0, content_index=0, delta=d)
        ev("response.output_text.done", item_id="msg_mock", output_index=0, content_index=0, text=REPLY)
        ev("response.content_part.done", item_id="msg_mock", output_index=0, content_index=0, part=text_part)
        ev("response.output_item.done", output_index=0, item=item)
        ev("response.completed", response=resp("completed", [item], usage))
        self.end_stream()

    def embeddings(self, body, n_in):
        inputs = body.get("input")
        count = len(inputs) if isinstance(inputs, list) else 1
        self.send_body(200, {
            "object": "list", "model": body.get("model", "unknown"),
            "data": [{"object": "embedding", "index": i,
                      "embedding": [round(0.125 * (i + 1) * (j + 1), 3) for j in range(8)]}
                     for i in range(count)],
            "usage": {"prompt_tokens": n_in, "total_tokens": n_in}})

    # --- Anthropic ------------------------------------------------------------------------
    def anthropic(self, body, n_in):
        model = body.get("model", "unknown")
        if not body.get("stream"):
            self.send_body(200, {
                "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": REPLY}], "stop_reason": "end_turn",
                "stop_sequence": None, "usage": {"input_tokens": n_in, "output_tokens": OUTPUT_TOKENS}})
            return
        self.start_stream("text/event-stream")

        def ev(kind, obj, split=False):
            self.sse(dict(type=kind, **obj), event=kind, split=split)

        ev("message_start", {"message": {
            "id": "msg_mock", "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": n_in, "output_tokens": 1}}})
        ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
        ev("ping", {})
        for i, d in enumerate(reply_deltas()):
            ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": d}},
               split=(i == 5))
        ev("content_block_stop", {"index": 0})
        ev("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None},
                             "usage": {"output_tokens": OUTPUT_TOKENS}})
        ev("message_stop", {})
        self.end_stream()

    # --- Gemini ---------------------------------------------------------------------------
    def gemini(self, body, n_in, model, stream, sse):
        def obj(text, done, n_out):
            cand = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
            if done:
                cand["finishReason"] = "STOP"
            return {"candidates": [cand],
                    "usageMetadata": {"promptTokenCount": n_in, "candidatesTokenCount": n_out,
                                      "totalTokenCount": n_in + n_out},
                    "modelVersion": model}

        if not stream:
            self.send_body(200, obj(REPLY, True, OUTPUT_TOKENS))
            return
        # Three chunks of words; usage is cumulative, as Gemini reports it.
        parts, words = [], reply_deltas()
        for lo, hi in ((0, 3), (3, 7), (7, 10)):
            parts.append(obj("".join(words[lo:hi]), hi == 10, hi))
        if sse:
            self.start_stream("text/event-stream")
            for p in parts:
                self.chunk("data: %s\r\n\r\n" % json.dumps(p))
        else:  # JSON array, streamed element by element
            self.start_stream("application/json")
            for i, p in enumerate(parts):
                self.chunk(("[" if i == 0 else ",\r\n") + json.dumps(p))
            self.chunk("]")
        self.end_stream()

    # --- Ollama ---------------------------------------------------------------------------
    def ollama(self, body, n_in):
        model = body.get("model", "unknown")
        chat = self.path.startswith("/api/chat")
        final = {"model": model, "created_at": "2026-11-26T17:00:00Z", "done": True,
                 "done_reason": "stop", "total_duration": 1000000, "load_duration": 1000,
                 "prompt_eval_count": n_in, "prompt_eval_duration": 1000,
                 "eval_count": OUTPUT_TOKENS, "eval_duration": 1000}

        def piece(text):
            if chat:
                return {"message": {"role": "assistant", "content": text}}
            return {"response": text}

        if body.get("stream") is False:
            self.send_body(200, dict(final, **piece(REPLY)))
            return
        self.start_stream("application/x-ndjson")
        for d in reply_deltas():
            self.chunk(json.dumps(dict({"model": model, "created_at": "2026-11-26T17:00:00Z",
                                        "done": False}, **piece(d))) + "\n")
        self.chunk(json.dumps(dict(final, **piece(""))) + "\n")
        self.end_stream()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def handle_error(self, request, client_address):
        if self.verbose:
            super().handle_error(request, client_address)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--name", default="", help="x-mock-server header and chat reply prefix")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    ctx.set_alpn_protocols(["http/1.1"])
    server = Server(("127.0.0.1", args.port), Handler)
    server.ssl_ctx = ctx
    server.verbose = args.verbose
    server.name = args.name
    server.stats, server.stats_lock = {}, threading.Lock()
    server.body_bytes = {}
    print("LISTENING %d" % server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
