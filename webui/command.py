"""``pisnoop web``: the dashboard service (``--hash-password``: the value for ``web.password_hash``).

Served by the standard library's WSGI server with one thread per request
(an operator or two, on the management address); ready for systemd
(``READY=1``) once it listens, stopped cleanly by SIGTERM.
"""

from __future__ import annotations

import argparse
import getpass
import signal
import socketserver
import sys
import threading
from wsgiref import simple_server

from appliance import config as config_mod
from appliance.errors import BadInput, UsageError
from appliance.redact import redact


class WebUnavailable(BadInput):
    """The dashboard cannot listen where the config says (address not here, port taken)."""


def configure(name: str, p: argparse.ArgumentParser) -> None:
    if name != "web":
        raise ValueError(f"webui.command has no command {name!r}")
    p.add_argument("--hash-password", action="store_true",
                   help="read a password (twice from a terminal, once from stdin otherwise) and print its hash "
                        "for web.password_hash")
    p.set_defaults(func=cmd_web)


def read_password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if first != getpass.getpass("again: "):
            raise UsageError("web --hash-password: the two passwords differ")
    else:
        first = sys.stdin.readline().rstrip("\n")
    if len(first) < 8:
        raise UsageError("web --hash-password: expected a password of at least 8 characters")
    return first


def cmd_web(args) -> int:
    from . import auth
    if args.hash_password:
        print(auth.hash_password(read_password()))
        return 0
    cfg = config_mod.load(args.config)
    if not cfg.web.password_hash:
        raise config_mod.ConfigError(cfg.source, "web.password_hash", None,
                                     "a hash from `pisnoop web --hash-password` (the dashboard needs a login)")
    from appliance import service, store

    from . import app as app_mod
    log = service.setup_logging("web", args.log_level)
    db = store.database(cfg.mongodb, "pisnoop-web")
    server = serve(app_mod.build(cfg, db), cfg.web.listen_host, cfg.web.port)
    log.info("dashboard on http://%s:%d/ (store %s)", cfg.web.listen_host, server.server_port,
             redact(cfg.mongodb.uri))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _s, _f: stop.set())
    thread = threading.Thread(target=server.serve_forever, name="web", daemon=True)
    thread.start()
    service.notify("READY=1")
    while not stop.wait(5.0):
        if not thread.is_alive():           # the server is gone: no more watchdog pings, systemd restarts us
            log.error("the web server thread ended")
            return 1
        service.notify("WATCHDOG=1")
    service.notify("STOPPING=1")
    server.shutdown()
    server.server_close()
    db.client.close()
    log.info("stopped")
    return 0


class _Server(socketserver.ThreadingMixIn, simple_server.WSGIServer):
    daemon_threads = True


class _Quiet(simple_server.WSGIRequestHandler):
    def log_message(self, format, *args):       # the app logs what matters (logins, buttons), not every GET
        pass


def serve(app, host: str, port: int) -> simple_server.WSGIServer:
    """A listening server (port 0: any free one, see ``server_port``); ``WebUnavailable`` if it cannot listen."""
    import ipaddress
    cls = _Server
    if ipaddress.ip_address(host).version == 6:
        import socket
        cls = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
    try:
        server = simple_server.make_server(host, port, app, server_class=cls, handler_class=_Quiet)
    except OSError as exc:
        raise WebUnavailable(f"web: cannot listen on {host}:{port}: {exc.strerror}") from None
    return server
