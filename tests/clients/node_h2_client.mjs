// HTTP/2 client for the AegisPlane integration tests: node's http2 module (TLS from the
// OpenSSL linked into /usr/bin/node), every request of the plan sent at once as concurrent
// streams on ONE session (one TLS connection).
//
// Usage: node node_h2_client.mjs --port P --plan-json JSON
// Plan: a list of {"method", "path", "headers", "body"} (a JSON body is sent compact).
// One JSON line per response, in plan order: {"i", "status", "bytes", "stream"}; a stream
// that fails prints {"i", "error"}. Exits 0 when every stream answered, 1 otherwise.

import { connect } from "node:http2";

function parseArgs(argv) {
  const args = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--port") args.port = Number(argv[++i]);
    else if (a === "--plan-json") args.plan = JSON.parse(argv[++i]);
    else throw new Error(`unknown argument ${a}`);
  }
  if (!args.port || !args.plan) throw new Error("--port and --plan-json are required");
  return args;
}

const args = parseArgs(process.argv.slice(2));
const session = connect(`https://127.0.0.1:${args.port}`, { rejectUnauthorized: false });
session.on("error", (e) => process.stderr.write(`session error: ${e.message}\n`));

function one(i, req) {
  return new Promise((resolve) => {
    const headers = { ":method": req.method ?? "GET", ":path": req.path, ...(req.headers ?? {}) };
    let body;
    if (req.body !== undefined && req.body !== null) {
      body = typeof req.body === "string" ? req.body : JSON.stringify(req.body);
      headers["content-type"] ??= "application/json";
    }
    const stream = session.request(headers, { endStream: body === undefined });
    let status = 0;
    let bytes = 0;
    stream.on("response", (h) => { status = h[":status"]; });
    stream.on("data", (c) => { bytes += c.length; });
    stream.on("end", () => resolve({ i, status, bytes, stream: stream.id }));
    stream.on("error", (e) => resolve({ i, error: e.message }));
    if (body !== undefined) stream.end(body);
  });
}

const results = await Promise.all(args.plan.map((req, i) => one(i, req)));
for (const r of results) process.stdout.write(JSON.stringify(r) + "\n");
session.close();
process.exitCode = results.every((r) => r.error === undefined) ? 0 : 1;
