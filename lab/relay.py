"""A TCP relay from a port inside a network namespace to one outside it.

The virtual appliance runs ovs-vswitchd in a namespace of its own (as the Pi
runs it on its own host) with the controller target ``tcp:127.0.0.1:6653``
exactly as in production, while the controller itself runs in the caller's
namespace. This relay carries that one OpenFlow connection across.

    python -m lab.relay --netns NS --listen 127.0.0.1:6653 --to 127.0.0.1:40123
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading

from appliance import netns


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _serve(conn: socket.socket, target: tuple[str, int]) -> None:
    try:
        up = socket.create_connection(target, timeout=5)
    except OSError:
        conn.close()  # the controller is down: the switch retries (max_backoff)
        return
    up.settimeout(None)
    for s in (conn, up):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t = threading.Thread(target=_pump, args=(up, conn), daemon=True)
    t.start()
    _pump(conn, up)
    t.join()
    conn.close()
    up.close()


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.relay")
    ap.add_argument("--netns", required=True)
    ap.add_argument("--listen", required=True, type=_hostport)
    ap.add_argument("--to", required=True, type=_hostport)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with netns.enter(args.netns):
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(args.listen)
        lsock.listen(16)
    print("relay ready", flush=True)
    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=_serve, args=(conn, args.to), daemon=True).start()


if __name__ == "__main__":
    raise SystemExit(main())
