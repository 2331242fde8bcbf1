'use strict';
/**
 * A real gRPC server (@grpc/grpc-js, no protoc) for fanout's root end-to-end tests: the same
 * protocol as `../grpc_py/server.py`.
 *
 * Serves `/fanout.lab.Echo/Call` (unary) and `/fanout.lab.Echo/Stream` (server streaming) with
 * opaque bytes (a generic service definition with identity serializers). A unary reply is
 * `<name>\n<request>`; a stream sends `<name>\n<i>` three times.
 * Prints `listening <port>` once it serves, then serves until stdin closes, SIGTERM, or
 * `--deadline-s`; it then stops (GOAWAY, grace 1 s, then every connection is cut) and prints one
 * JSON line with the calls it answered: `{"name": ..., "answered": N, "unary": N, "streams": N}`
 * (a stream counts once its three messages were sent).
 *
 * Flags: `--addr HOST:PORT --name NAME [--tls-cert PEM --tls-key PEM]
 * [--max-connection-age-ms MS] [--deadline-s S]`.
 *
 * Keepalive: grpc-js servers have no ping-strike policy (no `grpc.http2.min_ping_interval_*`,
 * `grpc.http2.max_ping_strikes`, never a GOAWAY "too_many_pings"): Node's HTTP/2 session acks
 * every PING, so clients may ping as often as they like and nothing needs to be allowed.
 * MaxConnectionAge is `grpc.max_connection_age_ms` (a GOAWAY once a connection is that old) with
 * `grpc.max_connection_age_grace_ms` of 1 s for the calls in flight.
 *
 * stdout carries only `listening` and the JSON line; diagnostics go to stderr.
 */

const fs = require('fs');

const args = require('./args');

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

const SERVICE = 'fanout.lab.Echo';
/** How long stopping waits for calls in flight before cutting every connection. */
const GRACE_MS = 1000;
/** setTimeout's longest delay (a longer one fires at once). */
const MAX_TIMER_MS = 2 ** 31 - 1;

/** Bytes in, bytes out: no serializer. */
const identity = (b) => b;

function method(name, responseStream) {
  return {
    path: `/${SERVICE}/${name}`,
    requestStream: false,
    responseStream,
    requestSerialize: identity,
    requestDeserialize: identity,
    responseSerialize: identity,
    responseDeserialize: identity,
  };
}

const ECHO = { Call: method('Call', false), Stream: method('Stream', true) };

function main() {
  const usage =
    'usage: server.js --addr HOST:PORT --name NAME [--tls-cert PEM --tls-key PEM] ' +
    '[--max-connection-age-ms MS] [--deadline-s S]';
  const a = args.parse(
    process.argv.slice(2),
    {
      'addr': 'string', // host:port to listen on
      'name': 'string', // backend name put in every reply
      'tls-cert': 'string',
      'tls-key': 'string',
      'max-connection-age-ms': 'number',
      'deadline-s': 'number',
    },
    usage,
    ['addr', 'name'],
  );
  const deadlineS = a.deadline_s ?? 120;

  const counts = { unary: 0, streams: 0 };
  const name = Buffer.from(a.name);
  const newline = Buffer.from('\n');

  const impl = {
    Call(call, callback) {
      counts.unary += 1;
      callback(null, Buffer.concat([name, newline, call.request]));
    },
    Stream(call) {
      // 'finish': every message was handed to the HTTP/2 stream (then the OK status follows).
      // Like server.py, a stream the client cancelled before that is not counted.
      call.on('finish', () => {
        if (!call.cancelled) counts.streams += 1;
      });
      for (let i = 0; i < 3; i++) {
        call.write(Buffer.concat([name, newline, Buffer.from(String(i))]));
      }
      call.end();
    },
  };

  const options = {};
  if (a.max_connection_age_ms) {
    options['grpc.max_connection_age_ms'] = a.max_connection_age_ms;
    options['grpc.max_connection_age_grace_ms'] = GRACE_MS;
  }
  const server = new grpc.Server(options);
  server.addService(ECHO, impl);

  let creds;
  if (a.tls_cert) {
    creds = grpc.ServerCredentials.createSsl(null, [
      { cert_chain: fs.readFileSync(a.tls_cert), private_key: fs.readFileSync(a.tls_key) },
    ]);
  } else {
    creds = grpc.ServerCredentials.createInsecure();
  }

  let stopping = false;
  let reported = false;
  const report = () => {
    if (reported) return;
    reported = true;
    const out = {
      name: a.name,
      answered: counts.unary + counts.streams,
      unary: counts.unary,
      streams: counts.streams,
    };
    process.stdout.write(JSON.stringify(out) + '\n', () => process.exit(0));
    setTimeout(() => process.exit(0), 2000);
  };
  const stop = () => {
    if (stopping) return;
    stopping = true;
    // GOAWAY to every connection; calls in flight get GRACE_MS, then every connection is cut
    // (which ends tryShutdown too).
    const force = setTimeout(() => server.forceShutdown(), GRACE_MS);
    server.tryShutdown(() => {
      clearTimeout(force);
      report();
    });
    // Bounded whatever happens: report anyway should the shutdown not complete.
    setTimeout(report, GRACE_MS + 3000);
  };

  server.bindAsync(a.addr, creds, (err, port) => {
    if (err) {
      process.stderr.write(`cannot listen on ${a.addr}: ${err.message}\n`);
      process.exit(2);
    }
    process.stdout.write(`listening ${port}\n`);
    process.once('SIGTERM', stop);
    process.stdin.on('end', stop);
    process.stdin.on('close', stop);
    process.stdin.on('error', stop);
    process.stdin.resume();
    setTimeout(stop, Math.min(deadlineS * 1000, MAX_TIMER_MS));
  });
}

main();
