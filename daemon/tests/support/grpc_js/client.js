'use strict';
/**
 * A real gRPC client (@grpc/grpc-js, no protoc) for fanout's root end-to-end tests: the same
 * protocol as `../grpc_py/client.py`.
 *
 * Calls `/fanout.lab.Echo/Call` (or `/fanout.lab.Echo/Stream` with `--stream`) on `--target`
 * (`ipv4:A:P,B:P` for an address list as a headless service resolves, or `ipv4:VIP:P`) every
 * `--pace-ms`, one call at a time, until stdin closes or `--duration-s` passes, then closes its
 * channels and prints one JSON line:
 * `{"ok": N, "failed": N, "per_backend": {name: N}, "channels": N, "errors": [...],
 * "keepalive_acks": N, "retried_maybe_sent": N}`.
 * Policies: `pick_first` (gRPC's default), `round_robin` (service config), `per_call` (a new
 * channel per call, closed after it, with its own subchannel pool so nothing is shared).
 * Prints `first ok` once the first call succeeded.
 *
 * Flags: `--target T --policy pick_first|round_robin|per_call [--tls-ca PEM] [--authority NAME]
 * [--pace-ms MS] [--duration-s S] [--max-calls N] [--stream] [--keepalive-ms MS]`.
 *
 * Messages are opaque bytes: `grpc.Client`'s `makeUnaryRequest` / `makeServerStreamRequest` with
 * identity serializers. TLS: the CA of `--tls-ca`; the certificate is checked against (and SNI
 * is) `--authority`, through `grpc.ssl_target_name_override`.
 * Keepalive (`--keepalive-ms`): `grpc.keepalive_time_ms`, 5 s timeout, also without calls.
 * grpc-js has no client-side ping throttle (C-core's `grpc.http2.max_pings_without_data` and
 * `min_time_between_pings_ms`): it pings `--keepalive-ms` after the previous ping's ack.
 * `keepalive_acks` counts the acks: with `--keepalive-ms` this script turns on grpc-js's
 * `keepalive` tracer and takes its log through `grpc.setLogger`; each
 * `Received ping response` line of that tracer is one keepalive PING acknowledged (those lines
 * are not printed). Without `--keepalive-ms` no PING is sent and `keepalive_acks` is 0.
 *
 * `retried_maybe_sent` counts attempts whose stream the server refused (REFUSED_STREAM, as for a
 * stream above a MaxConnectionAge GOAWAY's last stream id) and that grpc-js retried
 * transparently: the `retrying_call` tracer's `handling status with progress REFUSED` lines.
 *
 * stdout carries only `first ok` and the JSON line; diagnostics go to stderr.
 */

const fs = require('fs');

const args = require('./args');

/** The tracer and trace text (transport.js) of a keepalive PING's ack. */
const KEEPALIVE_TRACER = 'keepalive';
const KEEPALIVE_ACK = 'Received ping response';
/**
 * The tracer and trace text (retrying-call.js) of an attempt whose stream the server refused
 * (RST_STREAM REFUSED_STREAM, as for a stream above a GOAWAY's last stream id): grpc-js retries
 * such a call transparently, once, so the call succeeds but its first attempt was on the wire.
 */
const RETRY_TRACER = 'retrying_call';
const REFUSED_ATTEMPT = 'handling status with progress REFUSED';

const keepaliveWanted = process.argv.some(
  (v) => v === '--keepalive-ms' || v.startsWith('--keepalive-ms='),
);
// grpc-js reads its tracers from the environment once, when it loads: add ours first.
{
  const ours = keepaliveWanted ? `${RETRY_TRACER},${KEEPALIVE_TRACER}` : RETRY_TRACER;
  const tracers = process.env.GRPC_NODE_TRACE ?? process.env.GRPC_TRACE ?? '';
  process.env.GRPC_NODE_TRACE = tracers ? `${tracers},${ours}` : ours;
}

let grpc;
try {
  grpc = require('@grpc/grpc-js');
} catch (e) {
  // The Rust test turns this into a failure naming what is missing.
  process.stderr.write(
    `MISSING @grpc/grpc-js: ${e.message.split('\n')[0]} ` +
      '(npm ci in daemon/tests/support/grpc_js, or cargo xtask setup)\n',
  );
  process.exit(3);
}

const ROUND_ROBIN = JSON.stringify({ loadBalancingConfig: [{ round_robin: {} }] });
const PICK_FIRST = JSON.stringify({ loadBalancingConfig: [{ pick_first: {} }] });
const POLICIES = ['pick_first', 'round_robin', 'per_call'];
/** Each call's deadline. */
const CALL_TIMEOUT_MS = 5000;
/** The errors a report keeps, and how long each may be. */
const MAX_ERRORS = 10;
const MAX_ERROR_LEN = 300;
/** setTimeout's longest delay (a longer one fires at once). */
const MAX_TIMER_MS = 2 ** 31 - 1;

/** Bytes in, bytes out: no serializer. */
const identity = (b) => b;

/** A failed call as client.py reports it: `<status>: <details>`, or the error's message. */
function describe(e) {
  const text =
    e && typeof e.code === 'number' && grpc.status[e.code] !== undefined
      ? `${grpc.status[e.code]}: ${e.details}`
      : String(e && e.message ? e.message : e);
  return text.slice(0, MAX_ERROR_LEN);
}

async function main() {
  const usage =
    'usage: client.js --target T --policy {pick_first,round_robin,per_call} [--tls-ca PEM] ' +
    '[--authority NAME] [--pace-ms MS] [--duration-s S] [--max-calls N] [--stream] ' +
    '[--keepalive-ms MS]';
  const a = args.parse(
    process.argv.slice(2),
    {
      'target': 'string',
      'policy': POLICIES,
      'tls-ca': 'string', // CA certificate (PEM): TLS instead of h2c
      'authority': 'string', // TLS: the name the certificate is checked against
      'pace-ms': 'number',
      'duration-s': 'number',
      'max-calls': 'int',
      'stream': 'flag', // server-streaming calls
      'keepalive-ms': 'int', // HTTP/2 keepalive pings this often
    },
    usage,
    ['target', 'policy'],
  );
  const authority = a.authority ?? 'backend.fanout.test';
  const paceMs = a.pace_ms ?? 40;
  const durationS = a.duration_s ?? 60;
  const maxCalls = a.max_calls ?? 100000;

  let keepaliveAcks = 0;
  let refusedAttempts = 0;
  {
    // Our tracers log at DEBUG: count keepalive acks and refused attempts, keep everything
    // else on stderr.
    const toStderr = (prefix) => (message, ...rest) => console.error(prefix + message, ...rest);
    const debug = toStderr('D ');
    grpc.setLogger({
      error: toStderr('E '),
      info: toStderr('I '),
      debug(message, ...rest) {
        const text = String(message);
        if (text.includes(` | ${KEEPALIVE_TRACER} | `)) {
          if (text.endsWith(KEEPALIVE_ACK)) keepaliveAcks += 1;
          return;
        }
        if (text.includes(` | ${RETRY_TRACER} | `)) {
          if (text.includes(REFUSED_ATTEMPT)) refusedAttempts += 1;
          return;
        }
        debug(message, ...rest);
      },
    });
    grpc.setLogVerbosity(grpc.logVerbosity.DEBUG);
  }

  const options = {
    'grpc.service_config': a.policy === 'round_robin' ? ROUND_ROBIN : PICK_FIRST,
  };
  if (a.policy === 'per_call') {
    // Channels with equal arguments share subchannels (connections) through the global pool
    // otherwise: a channel per call must really dial per call.
    options['grpc.use_local_subchannel_pool'] = 1;
  }
  if (a.keepalive_ms) {
    options['grpc.keepalive_time_ms'] = a.keepalive_ms;
    options['grpc.keepalive_timeout_ms'] = 5000;
    options['grpc.keepalive_permit_without_calls'] = 1;
  }
  let creds;
  if (a.tls_ca) {
    creds = grpc.credentials.createSsl(fs.readFileSync(a.tls_ca));
    options['grpc.ssl_target_name_override'] = authority;
  } else {
    creds = grpc.credentials.createInsecure();
  }
  const newChannel = () => new grpc.Client(a.target, creds, options);

  // stdin closing stops the loop, and cuts the pause between calls short.
  let stop = false;
  let wake = () => {};
  const stopNow = () => {
    stop = true;
    wake();
  };
  process.stdin.on('end', stopNow);
  process.stdin.on('close', stopNow);
  process.stdin.on('error', stopNow);
  process.stdin.resume();
  const pause = (ms) =>
    new Promise((resolve) => {
      if (stop) return resolve();
      const t = setTimeout(resolve, Math.min(ms, MAX_TIMER_MS));
      wake = () => {
        clearTimeout(t);
        resolve();
      };
    });

  /** One call; resolves to the backend's name (the reply's first line). */
  const oneCall = (client) =>
    new Promise((resolve, reject) => {
      const deadline = Date.now() + CALL_TIMEOUT_MS;
      const request = Buffer.from('hello');
      const backend = (msg) => msg.toString().split('\n', 1)[0];
      if (!a.stream) {
        client.makeUnaryRequest(
          '/fanout.lab.Echo/Call',
          identity,
          identity,
          request,
          new grpc.Metadata(),
          { deadline },
          (err, reply) => (err ? reject(err) : resolve(backend(reply))),
        );
        return;
      }
      const msgs = [];
      const call = client.makeServerStreamRequest(
        '/fanout.lab.Echo/Stream',
        identity,
        identity,
        request,
        new grpc.Metadata(),
        { deadline },
      );
      call.on('data', (m) => msgs.push(m));
      // A failed call emits 'error' (then never 'end'); an OK one 'end' after its last message.
      call.on('error', reject);
      call.on('end', () => {
        if (msgs.length !== 3) reject(new Error(`stream sent ${msgs.length} messages`));
        else resolve(backend(msgs[0]));
      });
    });

  let ok = 0;
  let failed = 0;
  let channels = 0;
  const perBackend = {};
  const errors = [];

  let shared = null;
  if (a.policy !== 'per_call') {
    shared = newChannel();
    channels += 1;
  }
  const end = Date.now() + durationS * 1000;
  try {
    for (let n = 0; n < maxCalls; n++) {
      if (stop || Date.now() >= end) break;
      let ch = shared;
      try {
        if (ch === null) {
          ch = newChannel();
          channels += 1;
        }
        const name = await oneCall(ch);
        ok += 1;
        perBackend[name] = (perBackend[name] ?? 0) + 1;
        if (ok === 1) process.stdout.write('first ok\n');
      } catch (e) {
        // Every failure is reported.
        failed += 1;
        if (errors.length < MAX_ERRORS) errors.push(describe(e));
      } finally {
        if (shared === null && ch !== null) ch.close();
      }
      await pause(paceMs);
    }
  } finally {
    if (shared !== null) shared.close();
  }
  const report = {
    ok,
    failed,
    per_backend: perBackend,
    channels,
    errors,
    keepalive_acks: keepaliveAcks,
    retried_maybe_sent: refusedAttempts,
  };
  // Exit at once (grpc-js timers or connections must not hold the process), once it is written.
  process.stdout.write(JSON.stringify(report) + '\n', () => process.exit(0));
  setTimeout(() => process.exit(0), 2000);
}

main().catch((e) => {
  process.stderr.write(`client failed: ${e && e.stack ? e.stack : e}\n`);
  process.exit(1);
});
