// Plan-driven HTTPS client for the AegisPlane integration tests: Node's global fetch
// (undici), whose TLS is the OpenSSL statically linked into /usr/bin/node.
//
// Usage: NODE_TLS_REJECT_UNAUTHORIZED=0 node node_client.mjs --port P
//            (--plan FILE | --plan-json JSON) [--host 127.0.0.1] [--print-body]
//
// Same plan format as py_client.py: a list of requests sent in order (undici keeps one
// keep-alive connection for sequential requests), or {"connections": [[...], ...]} whose
// lists run concurrently (undici then opens one connection per in-flight request).
// A JSON body is serialised with JSON.stringify (compact, same bytes as py_client.py).
// fetch sends "accept-encoding: gzip, deflate" by default, so the mock gzips every
// non-streamed JSON answer; "bytes" is the length of the DECODED body.
// One JSON line per response: {"conn", "i", "status", "bytes", "content_encoding", "server"}
// ("server": the mock's x-mock-server header, set by mock_provider.py --name).

import { readFileSync } from "node:fs";

function parseArgs(argv) {
  const args = { host: "127.0.0.1", printBody: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--port") args.port = Number(argv[++i]);
    else if (a === "--host") args.host = argv[++i];
    else if (a === "--plan") args.plan = JSON.parse(readFileSync(argv[++i], "utf8"));
    else if (a === "--plan-json") args.plan = JSON.parse(argv[++i]);
    else if (a === "--print-body") args.printBody = true;
    else throw new Error(`unknown argument ${a}`);
  }
  if (!args.port || !args.plan) throw new Error("--port and --plan/--plan-json are required");
  return args;
}

async function runConnection(conn, base, requests, printBody) {
  for (const [i, req] of requests.entries()) {
    const headers = { ...(req.headers ?? {}) };
    let body;
    if (req.body !== undefined && req.body !== null) {
      body = typeof req.body === "string" ? req.body : JSON.stringify(req.body);
      if (!Object.keys(headers).some((k) => k.toLowerCase() === "content-type")) {
        headers["Content-Type"] = "application/json";
      }
    }
    const resp = await fetch(base + req.path, { method: req.method ?? "GET", headers, body });
    const data = Buffer.from(await resp.arrayBuffer()); // reads the whole body, streams too
    const line = {
      conn, i, status: resp.status, bytes: data.length,
      content_encoding: resp.headers.get("content-encoding"),
      server: resp.headers.get("x-mock-server"),
    };
    if (printBody) line.body = data.toString("utf8");
    process.stdout.write(JSON.stringify(line) + "\n");
    // undici frees the connection a tick after the body ends; without this pause the
    // next request may open a second connection instead of reusing the first.
    await new Promise((resolve) => setImmediate(resolve));
  }
}

const args = parseArgs(process.argv.slice(2));
const base = `https://${args.host}:${args.port}`;
const connections = Array.isArray(args.plan) ? [args.plan] : args.plan.connections;
try {
  await Promise.all(connections.map((reqs, c) => runConnection(c, base, reqs, args.printBody)));
} catch (err) {
  process.stderr.write(`node_client: ${err?.stack ?? err} ${err?.cause ?? ""}\n`);
  process.exit(1);
}
