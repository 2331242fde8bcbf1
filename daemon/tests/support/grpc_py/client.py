"""A real gRPC client (grpcio, no protoc) for fanout's root end-to-end tests.

Calls `/fanout.lab.Echo/Call` (or `/fanout.lab.Echo/Stream` with `--stream`) on `--target`
(`ipv4:A:P,B:P` for an address list as a headless service resolves, or `ipv4:VIP:P`) every
`--pace-ms`, until stdin closes or `--duration-s` passes, then closes its channels and prints one
JSON line: `{"ok": N, "failed": N, "per_backend": {name: N}, "channels": N, "errors": [...]}`.
Policies: `pick_first` (gRPC's default), `round_robin` (service config), `per_call` (a new
channel per call, closed after it, with its own subchannel pool so nothing is shared).
Prints `first ok` once the first call succeeded.
"""

import argparse
import json
import threading
import time

from common import import_grpc, set_on_stdin_eof

grpc = import_grpc()

ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
PICK_FIRST = json.dumps({"loadBalancingConfig": [{"pick_first": {}}]})
IDENTITY = None  # bytes in, bytes out: no serializer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True)
    p.add_argument("--policy", choices=["pick_first", "round_robin", "per_call"], required=True)
    p.add_argument("--tls-ca", help="CA certificate (PEM): TLS instead of h2c")
    p.add_argument("--authority", default="backend.fanout.test",
                   help="TLS: the name the certificate is checked against")
    p.add_argument("--pace-ms", type=float, default=40.0)
    p.add_argument("--duration-s", type=float, default=60.0)
    p.add_argument("--max-calls", type=int, default=100000)
    p.add_argument("--stream", action="store_true", help="server-streaming calls")
    p.add_argument("--keepalive-ms", type=int, help="HTTP/2 keepalive pings this often")
    a = p.parse_args()

    options = []
    if a.policy == "round_robin":
        options.append(("grpc.service_config", ROUND_ROBIN))
    else:
        options.append(("grpc.service_config", PICK_FIRST))
    if a.policy == "per_call":
        # Channels with equal arguments share subchannels (connections) through the global pool
        # otherwise: a channel per call must really dial per call.
        options.append(("grpc.use_local_subchannel_pool", 1))
    if a.keepalive_ms:
        options += [
            ("grpc.keepalive_time_ms", a.keepalive_ms),
            ("grpc.keepalive_timeout_ms", 5000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_time_between_pings_ms", a.keepalive_ms),
        ]
    creds = None
    if a.tls_ca:
        with open(a.tls_ca, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        options.append(("grpc.ssl_target_name_override", a.authority))

    def new_channel():
        if creds is not None:
            return grpc.secure_channel(a.target, creds, options=options)
        return grpc.insecure_channel(a.target, options=options)

    stop = threading.Event()

    set_on_stdin_eof(stop)

    ok, failed, channels = 0, 0, 0
    per_backend, errors = {}, []

    def one_call(ch):
        if a.stream:
            rpc = ch.unary_stream("/fanout.lab.Echo/Stream", IDENTITY, IDENTITY)
            msgs = list(rpc(b"hello", timeout=5.0))
            if len(msgs) != 3:
                raise RuntimeError(f"stream sent {len(msgs)} messages")
            return msgs[0].split(b"\n", 1)[0].decode()
        rpc = ch.unary_unary("/fanout.lab.Echo/Call", IDENTITY, IDENTITY)
        return rpc(b"hello", timeout=5.0).split(b"\n", 1)[0].decode()

    shared = None
    if a.policy != "per_call":
        shared = new_channel()
        channels += 1
    end = time.monotonic() + a.duration_s
    try:
        for _ in range(a.max_calls):
            if stop.is_set() or time.monotonic() >= end:
                break
            ch = shared
            if ch is None:
                ch = new_channel()
                channels += 1
            try:
                name = one_call(ch)
                ok += 1
                per_backend[name] = per_backend.get(name, 0) + 1
                if ok == 1:
                    print("first ok", flush=True)
            except Exception as e:  # noqa: BLE001 - every failure is reported
                failed += 1
                if len(errors) < 10:
                    if isinstance(e, grpc.RpcError):
                        errors.append(f"{e.code()}: {e.details()}"[:300])
                    else:
                        errors.append(str(e)[:300])
            finally:
                if shared is None:
                    ch.close()
            stop.wait(a.pace_ms / 1000.0)
    finally:
        if shared is not None:
            shared.close()
    print(json.dumps({"ok": ok, "failed": failed, "per_backend": per_backend,
                      "channels": channels, "errors": errors}), flush=True)


if __name__ == "__main__":
    main()
