"""What `client.py` and `server.py` share: loading grpcio, and stopping when stdin closes."""

import os
import sys
import threading


def import_grpc():
    """grpcio's module; exits 3 with `MISSING grpcio` on stderr without it (the Rust test turns
    that into a failure naming what is missing)."""
    try:
        import grpc
    except ImportError as e:
        print(f"MISSING grpcio: {e} (pip install grpcio, or cargo xtask setup)", file=sys.stderr)
        sys.exit(3)
    return grpc


def set_on_stdin_eof(event: threading.Event):
    """Sets `event` once stdin closes (the test's way to ask for the report), from a daemon
    thread."""

    def wait():
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        event.set()

    threading.Thread(target=wait, daemon=True).start()
