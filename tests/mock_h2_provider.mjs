// HTTP/2-only TLS mock model provider for the AegisPlane integration tests (ALPN h2):
// node's http2.createSecureServer, whose TLS is the OpenSSL statically linked into
// /usr/bin/node (so the agent sees the serving end too).
//
// Usage: node mock_h2_provider.mjs --cert FILE --key FILE [--port 0]
// Prints "LISTENING <port>" once ready.
//
// POST /v1/chat/completions answers in the OpenAI shape, streamed (SSE, with usage in the
// last chunk when stream_options.include_usage) or not (JSON, gzip when the client accepts
// it). Usage is exact and known to the tests: prompt_tokens = the characters of all message
// contents, completion_tokens = 5 (3 chunks of content when streamed, counted as 5).
// Request headers: x-mock-status (the status to answer), x-mock-delay-ms (hold the answer).
// GET /health answers "ok". Every stream is logged to stderr.

import { createSecureServer } from "node:http2";
import { readFileSync } from "node:fs";
import { gzipSync } from "node:zlib";

function parseArgs(argv) {
  const args = { port: 0 };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--cert") args.cert = argv[++i];
    else if (a === "--key") args.key = argv[++i];
    else if (a === "--port") args.port = Number(argv[++i]);
    else throw new Error(`unknown argument ${a}`);
  }
  if (!args.cert || !args.key) throw new Error("--cert and --key are required");
  return args;
}

const COMPLETION_TOKENS = 5;

function answer(stream, headers, body) {
  let req;
  try {
    req = JSON.parse(body.toString("utf8"));
  } catch {
    stream.respond({ ":status": 400, "content-type": "application/json" });
    stream.end(JSON.stringify({ error: { message: "body is not JSON" } }));
    return;
  }
  const model = req.model ?? "unknown";
  const promptTokens = (req.messages ?? []).reduce((n, m) => n + String(m.content ?? "").length, 0);
  const status = Number(headers["x-mock-status"] ?? 200);
  const usage = { prompt_tokens: promptTokens, completion_tokens: COMPLETION_TOKENS, total_tokens: promptTokens + COMPLETION_TOKENS };
  if (status !== 200) {
    stream.respond({ ":status": status, "content-type": "application/json" });
    stream.end(JSON.stringify({ error: { message: `mock status ${status}`, type: "mock_error" } }));
    return;
  }
  if (req.stream) {
    stream.respond({ ":status": 200, "content-type": "text/event-stream", "cache-control": "no-cache" });
    const chunk = (delta, finish, withUsage) => {
      const c = { id: "chatcmpl-h2", object: "chat.completion.chunk", created: 1, model, choices: [{ index: 0, delta, finish_reason: finish }] };
      if (withUsage) c.usage = usage;
      return `data: ${JSON.stringify(c)}\n\n`;
    };
    stream.write(chunk({ role: "assistant", content: "Hel" }, null, false));
    stream.write(chunk({ content: "lo" }, null, false));
    const include = req.stream_options?.include_usage === true;
    stream.write(chunk({}, "stop", include));
    stream.end("data: [DONE]\n\n");
    return;
  }
  const json = JSON.stringify({
    id: "chatcmpl-h2", object: "chat.completion", created: 1, model,
    choices: [{ index: 0, message: { role: "assistant", content: "Hello" }, finish_reason: "stop" }],
    usage,
  });
  if (/\bgzip\b/.test(String(headers["accept-encoding"] ?? ""))) {
    stream.respond({ ":status": 200, "content-type": "application/json", "content-encoding": "gzip" });
    stream.end(gzipSync(json));
  } else {
    stream.respond({ ":status": 200, "content-type": "application/json" });
    stream.end(json);
  }
}

const args = parseArgs(process.argv.slice(2));
const server = createSecureServer({ cert: readFileSync(args.cert), key: readFileSync(args.key), allowHTTP1: false });
server.on("stream", (stream, headers) => {
  const chunks = [];
  stream.on("data", (c) => chunks.push(c));
  stream.on("error", (e) => process.stderr.write(`stream ${stream.id} error: ${e.message}\n`));
  stream.on("end", () => {
    const body = Buffer.concat(chunks);
    process.stderr.write(`${headers[":method"]} ${headers[":path"]} stream ${stream.id} (${body.length} bytes)\n`);
    const delay = Number(headers["x-mock-delay-ms"] ?? 0);
    const go = () => {
      if (stream.destroyed || stream.closed) return;
      if (headers[":path"] === "/health") {
        stream.respond({ ":status": 200, "content-type": "text/plain" });
        stream.end("ok");
      } else if (headers[":method"] === "POST" && headers[":path"] === "/v1/chat/completions") {
        answer(stream, headers, body);
      } else {
        stream.respond({ ":status": 404 });
        stream.end();
      }
    };
    if (delay > 0) setTimeout(go, delay);
    else go();
  });
});
server.on("sessionError", (e) => process.stderr.write(`session error: ${e.message}\n`));
server.listen(args.port, "127.0.0.1", () => {
  process.stdout.write(`LISTENING ${server.address().port}\n`);
});
