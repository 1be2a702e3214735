// An independent gRPC client (grpc-js, Node) for tests/test_data_plane.py: a few calls of
// every kind through the proxy, on raw bytes (no protos). Prints one JSON object with what
// it saw; the Python test checks it. Usage: node client.js PORT ACCESS_TOKEN
"use strict";

const grpc = require("@grpc/grpc-js");

const [port, token] = process.argv.slice(2);
const client = new grpc.Client(`127.0.0.1:${port}`, grpc.credentials.createInsecure(), {
  "grpc.max_receive_message_length": 64 * 1024 * 1024,
  "grpc.max_send_message_length": 64 * 1024 * 1024,
});
const raw = (b) => b;
const deadline = (seconds) => ({ deadline: new Date(Date.now() + seconds * 1000) });

function md(withToken, pairs = []) {
  const m = new grpc.Metadata();
  if (withToken) m.add("authorization", `Bearer ${token}`);
  for (const [k, v] of pairs) m.add(k, v);
  return m;
}

function pairs(metadata) {
  // [key, value] with -bin values as hex, in order, for x-* keys
  const out = [];
  for (const [k, values] of Object.entries(metadata.toJSON())) {
    if (!k.startsWith("x-")) continue;
    for (const v of values) out.push([k, Buffer.isBuffer(v) ? "hex:" + v.toString("hex") : v]);
  }
  return out;
}

function unary(path, request, metadata, options) {
  return new Promise((resolve) => {
    const result = {};
    const call = client.makeUnaryRequest(path, raw, raw, request, metadata, options, (err, response) => {
      result.response = response;
      result.code = err ? err.code : 0;
      result.details = err ? err.details : "";
    });
    call.on("metadata", (m) => (result.headers = pairs(m)));
    call.on("status", (s) => {
      result.trailers = pairs(s.metadata);
      resolve(result);
    });
  });
}

async function main() {
  const out = {};
  const payload = Buffer.alloc(3 * 1024 * 1024);
  for (let i = 0; i < payload.length; i++) payload[i] = (i * 7) & 0xff;

  const echo = await unary("/test.Access/Echo", payload, md(true), deadline(30));
  out.echo = {
    code: echo.code,
    same: Buffer.isBuffer(echo.response) && echo.response.equals(payload),
    headers: echo.headers,
    trailers: echo.trailers,
  };

  const sent = [
    ["x-m-text", "a b c"],
    ["x-m-data-bin", Buffer.from([0, 1, 254, 255])],
  ];
  const report = await unary("/test.Access/Report", Buffer.from("{}"), md(true, sent), deadline(10));
  out.report = { code: report.code, body: JSON.parse(report.response.toString()) };

  out.count = await new Promise((resolve) => {
    const got = [];
    const call = client.makeServerStreamRequest(
      "/test.Access/Count", raw, raw, Buffer.from('{"n": 20}'), md(true), deadline(10));
    call.on("data", (m) => got.push(m.toString()));
    call.on("error", () => {});
    call.on("status", (s) => resolve({ code: s.code, messages: got }));
  });

  out.chat = await new Promise((resolve) => {
    const got = [];
    const call = client.makeBidiStreamRequest("/test.Access/Chat", raw, raw, md(true), deadline(10));
    let n = 0;
    const next = () => {
      if (n < 3) call.write(Buffer.from(`m${n++}`));
      else call.end();
    };
    call.on("data", (m) => {
      got.push(m.toString());
      next();
    });
    call.on("error", () => {});
    call.on("status", (s) => resolve({ code: s.code, messages: got }));
    next();
  });

  const denied = await unary("/test.Access/Echo", Buffer.from("x"), md(false), deadline(10));
  out.denied = { code: denied.code };

  const failed = await unary(
    "/test.Access/Fail", Buffer.from('{"code": "NOT_FOUND", "message": "no such record"}'),
    md(true), deadline(10));
  out.fail = { code: failed.code, details: failed.details, trailers: failed.trailers };

  const hang = await unary("/test.Access/Hang", Buffer.from("{}"), md(true), deadline(1));
  out.hang = { code: hang.code };

  client.close();
  process.stdout.write(JSON.stringify(out));
}

main().catch((e) => {
  process.stderr.write(String(e && e.stack ? e.stack : e));
  process.exit(1);
});
