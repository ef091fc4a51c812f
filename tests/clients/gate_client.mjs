// HTTPS client for the content-gate tests, node's side of gate_client.py: one new TLS
// connection per step (https.request, agent: false), through the OpenSSL linked into
// /usr/bin/node, which encrypts into memory and sends after SSL_write returns.
//
// Usage: NODE_TLS_REJECT_UNAUTHORIZED=0 node gate_client.mjs --port P --steps JSON
// Same steps and output lines as gate_client.py:
//   {"step", "local", "peer"} once connected (TLS handshake done), then
//   {"step", "status", "bytes"} or {"step", "write_errno": null, "error": CODE, "read": ...}.

import https from "node:https";

function parseArgs(argv) {
  const args = {};
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--port") args.port = Number(argv[++i]);
    else if (argv[i] === "--steps") args.steps = JSON.parse(argv[++i]);
    else throw new Error(`unknown argument ${argv[i]}`);
  }
  return args;
}

const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

function step(port, name, body) {
  return new Promise((resolve) => {
    const req = https.request({
      host: "127.0.0.1", port, path: "/v1/chat/completions", method: "POST", agent: false,
      rejectUnauthorized: false,
      headers: { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body) },
    });
    let done = false;
    const finish = (obj) => { if (!done) { done = true; out(obj); resolve(); } };
    req.on("socket", (sock) => sock.on("secureConnect", () => {
      out({ step: name, local: `${sock.localAddress}:${sock.localPort}`, peer: `${sock.remoteAddress}:${sock.remotePort}` });
    }));
    req.on("response", (res) => {
      let bytes = 0;
      res.on("data", (d) => { bytes += d.length; });
      res.on("end", () => finish({ step: name, status: res.statusCode, bytes }));
      res.on("error", (e) => finish({ step: name, write_errno: null, error: e.code ?? String(e), read: "response error" }));
    });
    req.on("error", (e) => finish({ step: name, write_errno: null, error: e.code ?? String(e), read: `error: ${e.message}` }));
    req.setTimeout(10000, () => req.destroy(new Error("timeout")));
    // Headers and body in one write (end() with data corks them together).
    req.end(body);
  });
}

const args = parseArgs(process.argv.slice(2));
for (const s of args.steps) await step(args.port, s.name, s.body);
