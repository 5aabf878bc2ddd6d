// The filter's .wasm under node's V8, outside Envoy, against a minimal proxy-wasm 0.2.1 host in
// JavaScript: request after request of one shape (headers, body, response head and body, log),
// so that what V8 runs of the filter can be counted (callgrind: deterministic instruction
// counts, where timings on these machines are not) and named (`perf` with --perf-basic-prof and
// a build that keeps the name section). Used by bench_wasm.py, beside it.
//
//   node wasm_harness.mjs FILTER.wasm PLUGIN_CONFIG.json REQUEST_BODY N
//
// Env: API_KEY (sent as a bearer token), REQUEST_PATH (default /v1/chat/completions), FOOTPRINT (print the memory one
// request writes instead of timing), THRASH (MiB of memory touched between two requests,
// as Envoy's own work between callbacks evicts the filter's code and data from the caches).
// Prints one line of JSON: requests, microseconds a request (timing is only indicative), host
// calls a request by name, and whether the request was routed.
import fs from "fs";

const [wasmPath, configPath, bodyPath, countArg] = process.argv.slice(2);
const N = Number(countArg || 10000);
const config = fs.readFileSync(configPath);
const body = fs.readFileSync(bodyPath);
const requestHeaders = [[":method", "POST"], [":path", process.env.REQUEST_PATH || "/v1/chat/completions"], [":authority", "127.0.0.1:8080"],
  [":scheme", "http"], ["content-type", "application/json"], ["content-length", String(body.length)],
  ["user-agent", "wrk"], ["x-forwarded-proto", "http"], ["x-request-id", "5f0c6d4e-1b2a-4c3d-9e8f-0a1b2c3d4e5f"]];
if (process.env.API_KEY) requestHeaders.push(["authorization", "Bearer " + process.env.API_KEY]);
// What the bench backend answers (integration-tests/bench/backend).
const responseBody = Buffer.from('{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench",' +
  '"choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the bench backend."},"finish_reason":"stop"}],' +
  '"usage":{"prompt_tokens":10,"completion_tokens":7,"total_tokens":17}}');
const responseHead = [[":status", "200"], ["content-type", "application/json"], ["content-length", String(responseBody.length)],
  ["date", "Wed, 02 Dec 2026 17:00:00 GMT"], ["x-envoy-upstream-service-time", "0"]];

// Proxy-wasm's constants.
const OK = 0, NOT_FOUND = 1, CAS_MISMATCH = 8, UNIMPLEMENTED = 12;
const REQUEST_HEADERS = 0, RESPONSE_HEADERS = 2;
const REQUEST_BODY = 0, RESPONSE_BODY = 1, VM_CONFIGURATION = 6, PLUGIN_CONFIGURATION = 7;

let instance;
let request = [], response = [];
const shared = new Map(); // key -> [value, cas]
let cas = 1;
const bytes = () => new Uint8Array(instance.exports.memory.buffer);
const view = () => new DataView(instance.exports.memory.buffer);
const text = (p, n) => Buffer.from(bytes().subarray(p, p + n)).toString();
const copy = (p, n) => Buffer.from(bytes().slice(p, p + n));
const headers = (map) => (map === REQUEST_HEADERS ? request : map === RESPONSE_HEADERS ? response : []);

// Data for the filter goes into memory it allocates (the ABI's `malloc` export), as Envoy does.
function give(data, pointerAt, sizeAt) {
  const at = instance.exports.malloc(data.length);
  bytes().set(data, at);
  view().setUint32(pointerAt, at, true);
  view().setUint32(sizeAt, data.length, true);
  return OK;
}

// A header map as proxy-wasm serializes it: count, (name size, value size) each, then each name
// and value followed by a NUL.
function serialize(pairs) {
  const encoded = pairs.map(([k, v]) => [Buffer.from(k), Buffer.from(v)]);
  let size = 4 + pairs.length * 8;
  for (const [k, v] of encoded) size += k.length + v.length + 2;
  const out = Buffer.alloc(size);
  out.writeUInt32LE(pairs.length, 0);
  let at = 4;
  for (const [k, v] of encoded) { out.writeUInt32LE(k.length, at); out.writeUInt32LE(v.length, at + 4); at += 8; }
  for (const [k, v] of encoded) { k.copy(out, at); at += k.length + 1; v.copy(out, at); at += v.length + 1; }
  return out;
}

function deserialize(data) {
  const count = data.readUInt32LE(0);
  const sizes = [];
  let at = 4;
  for (let i = 0; i < count; i++, at += 8) sizes.push([data.readUInt32LE(at), data.readUInt32LE(at + 4)]);
  return sizes.map(([k, v]) => {
    const pair = [data.toString("utf8", at, at + k), data.toString("utf8", at + k + 1, at + k + 1 + v)];
    at += k + v + 2;
    return pair;
  });
}

function put(map, name, value) {
  const m = headers(map);
  const i = m.findIndex(([n]) => n === name);
  if (i >= 0) m[i] = [name, value]; else m.push([name, value]);
}

const unimplemented = () => UNIMPLEMENTED;
const env = {
  proxy_log: () => OK,
  proxy_set_tick_period_milliseconds: () => OK,
  proxy_get_buffer_bytes: (type, start, max, pointerAt, sizeAt) => {
    const data = { [REQUEST_BODY]: body, [RESPONSE_BODY]: responseBody, [VM_CONFIGURATION]: Buffer.alloc(0),
      [PLUGIN_CONFIGURATION]: config }[type];
    return data ? give(data.subarray(start, start + max), pointerAt, sizeAt) : NOT_FOUND;
  },
  proxy_set_buffer_bytes: () => OK,
  proxy_get_header_map_pairs: (map, pointerAt, sizeAt) => give(serialize(headers(map)), pointerAt, sizeAt),
  proxy_set_header_map_pairs: (map, p, n) => {
    const pairs = deserialize(copy(p, n));
    if (map === REQUEST_HEADERS) request = pairs; else if (map === RESPONSE_HEADERS) response = pairs;
    return OK;
  },
  proxy_get_header_map_value: (map, p, n, pointerAt, sizeAt) => {
    const found = headers(map).find(([name]) => name === text(p, n));
    return found ? give(Buffer.from(found[1]), pointerAt, sizeAt) : NOT_FOUND;
  },
  proxy_replace_header_map_value: (map, kp, kn, vp, vn) => { put(map, text(kp, kn), text(vp, vn)); return OK; },
  proxy_add_header_map_value: (map, kp, kn, vp, vn) => { headers(map).push([text(kp, kn), text(vp, vn)]); return OK; },
  proxy_remove_header_map_value: (map, p, n) => {
    const m = headers(map);
    const i = m.findIndex(([name]) => name === text(p, n));
    if (i >= 0) m.splice(i, 1);
    return OK;
  },
  proxy_get_property: (p, n, pointerAt, sizeAt) => {
    const path = text(p, n).split("\0").filter(Boolean).join(".");
    return path === "source.address" ? give(Buffer.from("127.0.0.1:43210"), pointerAt, sizeAt) : NOT_FOUND;
  },
  proxy_set_property: () => OK,
  proxy_get_shared_data: (p, n, pointerAt, sizeAt, casAt) => {
    const entry = shared.get(text(p, n));
    if (!entry) return NOT_FOUND;
    give(entry[0], pointerAt, sizeAt);
    view().setUint32(casAt, entry[1], true);
    return OK;
  },
  proxy_set_shared_data: (kp, kn, vp, vn, expected) => {
    const key = text(kp, kn);
    const entry = shared.get(key);
    if (expected !== 0 && entry && entry[1] !== expected) return CAS_MISMATCH;
    shared.set(key, [copy(vp, vn), ++cas]);
    return OK;
  },
  proxy_get_current_time_nanoseconds: (at) => {
    view().setBigUint64(at, 1_700_000_000_000_000_000n + process.hrtime.bigint(), true);
    return OK;
  },
  proxy_define_metric: (type, p, n, idAt) => { view().setUint32(idAt, 1, true); return OK; },
  proxy_increment_metric: () => OK,
  proxy_record_metric: () => OK,
  proxy_send_local_response: (status) => { throw new Error(`the filter answered ${status} itself`); },
  proxy_continue_stream: () => OK,
  proxy_close_stream: () => OK,
  proxy_set_effective_context: () => OK,
  proxy_done: () => OK,
};
for (const name of ["proxy_get_status", "proxy_call_foreign_function", "proxy_http_call", "proxy_grpc_call",
  "proxy_grpc_stream", "proxy_grpc_send", "proxy_grpc_cancel", "proxy_grpc_close", "proxy_register_shared_queue",
  "proxy_resolve_shared_queue", "proxy_enqueue_shared_queue", "proxy_dequeue_shared_queue"]) env[name] = unimplemented;

// Every host call counted by name.
const counts = {};
for (const [name, f] of Object.entries(env)) env[name] = (...args) => { counts[name] = (counts[name] || 0) + 1; return f(...args); };

instance = new WebAssembly.Instance(new WebAssembly.Module(fs.readFileSync(wasmPath)), { env });
const x = instance.exports;
x._initialize();
x.proxy_on_context_create(1, 0);
x.proxy_on_vm_start(1, 0);
if (!x.proxy_on_configure(1, config.length)) throw new Error("the filter refused its configuration");

let context = 2;
function exchange() {
  request = requestHeaders.map((pair) => pair.slice());
  response = responseHead.map((pair) => pair.slice());
  const id = context++;
  x.proxy_on_context_create(id, 1);
  x.proxy_on_request_headers(id, request.length, 0);
  x.proxy_on_request_body(id, body.length, 1);
  x.proxy_on_response_headers(id, response.length, 0);
  x.proxy_on_response_body(id, responseBody.length, 1);
  x.proxy_on_log(id);
  x.proxy_on_done(id);
  x.proxy_on_delete(id);
}
// The root context's tick (metrics handed to Envoy) about once a second at ~1,000 requests/s.
const tickEvery = 1000;
for (let i = 0; i < 2000; i++) { exchange(); if (i % tickEvery === 0) x.proxy_on_tick(1); }

// FOOTPRINT: the filter's linear memory written by one request, in 64-byte lines (a lower bound
// of the data it touches: reads are not seen), from snapshots around single requests.
if (process.env.FOOTPRINT) {
  const lines = [];
  for (let i = 0; i < 50; i++) {
    const before = bytes().slice();
    exchange();
    const after = bytes();
    let written = 0;
    for (let at = 0; at < before.length; at += 64) {
      for (let k = at; k < Math.min(at + 64, before.length); k++) {
        if (before[k] !== after[k]) { written++; break; }
      }
    }
    lines.push(written);
  }
  lines.sort((a, b) => a - b);
  console.log(JSON.stringify({ footprint_lines: lines[lines.length >> 1], memory_bytes: bytes().length,
    routed_to: (request.find(([name]) => name === "x-jairouter-cluster") || [])[1] || null }));
  process.exit(0);
}

for (const name in counts) delete counts[name];
const thrash = new Uint8Array(Number(process.env.THRASH || 0) * 1024 * 1024);
let nanoseconds = 0;
for (let i = 0; i < N; i++) {
  for (let j = 0; j < thrash.length; j += 64) thrash[j]++;
  const started = process.hrtime.bigint();
  exchange();
  if (i % tickEvery === 0) x.proxy_on_tick(1);
  nanoseconds += Number(process.hrtime.bigint() - started);
}
const perRequest = Object.fromEntries(Object.entries(counts).sort((a, b) => b[1] - a[1])
  .map(([name, n]) => [name, Math.round((n / N) * 100) / 100]));
console.log(JSON.stringify({
  requests: N,
  us_per_request: Math.round(nanoseconds / N / 10) / 100,
  host_calls: perRequest,
  routed_to: (request.find(([name]) => name === "x-jairouter-cluster") || [])[1] || null,
  response_headers: response,
}));
