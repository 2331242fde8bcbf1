"""A real gRPC server (grpcio, no protoc) for fanout's root end-to-end tests.

Serves `/fanout.lab.Echo/Call` (unary) and `/fanout.lab.Echo/Stream` (server streaming) with
opaque bytes. A unary reply is `<name>\n<request>`; a stream sends `<name>\n<i>` three times.
Prints `listening <port>` once it serves, then serves until stdin closes, SIGTERM, or
`--deadline-s`; it then stops (grace 1 s) and prints one JSON line with the calls it answered:
`{"name": ..., "answered": N, "unary": N, "streams": N}`.
"""

import argparse
import json
import signal
import sys
import threading

from common import import_grpc, set_on_stdin_eof

grpc = import_grpc()

SERVICE = "fanout.lab.Echo"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--addr", required=True, help="host:port to listen on")
    p.add_argument("--name", required=True, help="backend name put in every reply")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--max-connection-age-ms", type=int)
    p.add_argument("--deadline-s", type=float, default=120.0)
    a = p.parse_args()

    lock = threading.Lock()
    counts = {"unary": 0, "streams": 0}
    name = a.name.encode()

    def call(request, context):
        with lock:
            counts["unary"] += 1
        return name + b"\n" + request

    def stream(request, context):
        for i in range(3):
            yield name + b"\n" + str(i).encode()
        with lock:
            counts["streams"] += 1

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Call": grpc.unary_unary_rpc_method_handler(call),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
        },
    )
    options = [
        # Clients in the tests ping every few hundred ms (keepalive): allow it, never GOAWAY
        # them for "too many pings".
        ("grpc.http2.min_ping_interval_without_data_ms", 50),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    if a.max_connection_age_ms:
        options += [
            ("grpc.max_connection_age_ms", a.max_connection_age_ms),
            ("grpc.max_connection_age_grace_ms", 1000),
        ]
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=options)
    server.add_generic_rpc_handlers((handler,))
    if a.tls_cert:
        with open(a.tls_cert, "rb") as f:
            cert = f.read()
        with open(a.tls_key, "rb") as f:
            key = f.read()
        port = server.add_secure_port(a.addr, grpc.ssl_server_credentials([(key, cert)]))
    else:
        port = server.add_insecure_port(a.addr)
    if port == 0:
        print(f"cannot listen on {a.addr}", file=sys.stderr)
        sys.exit(2)
    server.start()
    print(f"listening {port}", flush=True)

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())

    set_on_stdin_eof(done)
    done.wait(a.deadline_s)
    server.stop(1.0).wait(5.0)
    with lock:
        out = dict(counts)
    out["name"] = a.name
    out["answered"] = out["unary"] + out["streams"]
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
