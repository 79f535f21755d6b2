"""The dashboard's routes (bottle): login, the pages, their JSON, the buttons, the evidence pcap.

Every response passes ``secure_headers`` (a WSGI wrapper, so redirects and
errors get them too). A page without a live session sends the browser to
``/login``; a JSON request without one is 401; a POST without one, or
without the session's CSRF token, is 403 and changes nothing.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from pathlib import Path

import bottle
import pymongo.errors

from appliance import statusview

from . import actions, auth, data, pages

STATIC = Path(__file__).with_name("static")
COOKIE = "pisnoop_session"
LOGIN_COOKIE = "pisnoop_login"        # the login form's own CSRF token (double submit: cookie and field)
FAILED_LOGIN_DELAY_S = 1.0
VERIFY_SLOTS = 2                      # scrypt takes 32 MiB per login: at most this many verify at once
VERIFY_WAIT_S = 0.5                   # a login waits this long for a slot, then is told to try again (503)
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "Cross-Origin-Opener-Policy": "same-origin"}
STATIC_TYPES = {".js": "application/javascript", ".css": "text/css", ".LICENSE": "text/plain"}

log = logging.getLogger("pisnoop.web")


def secure_headers(app):
    """WSGI wrapper: the security headers on every response; ``no-store`` on all but the static files."""
    def wrapped(environ, start_response):
        def start(status, headers, exc_info=None):
            names = {k.lower() for k, _v in headers}
            headers = [*headers, *((k, v) for k, v in PAGE_HEADERS.items() if k.lower() not in names)]
            if "cache-control" not in names:
                headers.append(("Cache-Control", "no-store"))
            return start_response(status, headers, exc_info)
        return app(environ, start)
    return wrapped


def build(cfg, db, clock=time.monotonic):
    """The WSGI application for ``cfg`` over the store ``db`` (pymongo database)."""
    app = bottle.Bottle()
    sessions = auth.Sessions(cfg.web.session_seconds, clock)
    password_hash = cfg.web.password_hash
    config_path = cfg.source
    verifying = threading.BoundedSemaphore(VERIFY_SLOTS)

    def session():
        return sessions.get(bottle.request.get_cookie(COOKIE))

    def page(fn):
        """A page: the session's (csrf, flash) to ``fn``, or the browser sent to the login page."""
        def handler(*a, **kw):
            s = session()
            if s is None:
                return bottle.redirect("/login", 303)
            flash, s.flash = getattr(s, "flash", ""), ""
            try:
                return fn(s.csrf, flash, *a, **kw)
            except pymongo.errors.PyMongoError as exc:
                return store_away(exc) + "\n"
        return handler

    def store_away(exc) -> str:
        """A 503 (plain text) and the store error's redacted line (``statusview.store_error``): no traceback."""
        text = f"the store did not answer: {statusview.store_error(exc)}"
        log.warning("%s: %s", bottle.request.path, text)
        bottle.response.status = 503
        bottle.response.content_type = "text/plain; charset=utf-8"
        bottle.response.headers.pop("Content-Disposition", None)
        return text

    def api(fn):
        def handler(*a, **kw):
            if session() is None:
                bottle.response.status = 401
                bottle.response.content_type = "application/json"
                return pages.as_json({"error": "log in first"})
            bottle.response.content_type = "application/json"
            try:
                return pages.as_json(fn(*a, **kw))
            except pymongo.errors.PyMongoError as exc:
                text = store_away(exc)
                bottle.response.content_type = "application/json"
                return pages.as_json({"error": text})
        return handler

    def post(fn):
        """A button: a live session and its CSRF token, else 403; then back to the page with the command's text."""
        def handler(*a, **kw):
            s = session()
            if s is None or not auth.same(bottle.request.forms.get("csrf"), s.csrf):
                log.warning("refused a POST to %s: %s", bottle.request.path,
                            "no session" if s is None else "no or wrong CSRF token")
                bottle.abort(403, "forbidden: no session or no valid CSRF token")
            try:
                back, outcome = fn(*a, **kw)
            except pymongo.errors.PyMongoError as exc:
                return store_away(exc) + "\n"
            if outcome is not None:
                s.flash = outcome.text if outcome.code == 0 else f"refused (exit {outcome.code}): {outcome.text}"
                log.info("%s: exit %d: %s", bottle.request.path, outcome.code, outcome.text)
            return bottle.redirect(back, 303)
        return handler

    @app.get("/login")
    def login_form():
        token = secrets.token_urlsafe(32)
        bottle.response.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="strict", path="/login")
        return pages.login(token, failed=bottle.request.query.get("failed") == "1")

    @app.post("/login")
    def login():
        if not auth.same(bottle.request.forms.get("csrf"), bottle.request.get_cookie(LOGIN_COOKIE)):
            bottle.abort(403, "forbidden: no valid CSRF token")
        if not verifying.acquire(timeout=VERIFY_WAIT_S):
            log.warning("login from %s refused: %d logins already being verified", bottle.request.remote_addr,
                        VERIFY_SLOTS)
            bottle.response.status = 503
            bottle.response.set_header("Retry-After", "1")
            bottle.response.content_type = "text/plain; charset=utf-8"
            return "busy, try again\n"
        try:
            right = auth.verify_password(bottle.request.forms.getunicode("password") or "", password_hash)
        finally:
            verifying.release()
        if not right:
            log.warning("failed login from %s", bottle.request.remote_addr)
            time.sleep(FAILED_LOGIN_DELAY_S)
            return bottle.redirect("/login?failed=1", 303)
        s = sessions.start()
        log.info("login from %s", bottle.request.remote_addr)
        bottle.response.delete_cookie(LOGIN_COOKIE, path="/login")
        bottle.response.set_cookie(COOKIE, s.token, httponly=True, samesite="strict", path="/",
                                   max_age=cfg.web.session_seconds)
        return bottle.redirect("/", 303)

    @app.post("/logout")
    @post
    def logout():
        sessions.end(bottle.request.get_cookie(COOKIE))
        bottle.response.delete_cookie(COOKIE, path="/")
        return "/login", None

    @app.get("/")
    @page
    def overview(csrf, flash):
        return pages.overview(data.overview(cfg, db), csrf, flash)

    @app.get("/api/overview")
    @api
    def overview_json():
        f = data.overview(cfg, db)
        return {"facts_html": pages.facts_html(f), "counters": pages.counters(f), "ok": f["ok"]}

    @app.get("/flags")
    @page
    def flags(csrf, flash):
        return pages.flags(data.flags(cfg, db), cfg.snooper.sensor, csrf, flash)

    @app.get("/api/flags/<flag_id>/chart")
    @api
    def chart(flag_id):
        doc = data.flag_doc(db, flag_id)
        if doc is None:
            bottle.response.status = 404
            return {"error": "no such flag"}
        return data.chart(cfg, db, doc)

    @app.get("/flags/<flag_id>/pcap")
    @page
    def pcap(csrf, flash, flag_id):
        doc = data.flag_doc(db, flag_id)
        if doc is None:
            bottle.abort(404, "no such flag")
        body, n = data.pcap(db, doc)
        log.info("evidence pcap of flag %s: %d frames", flag_id, n)
        bottle.response.content_type = "application/vnd.tcpdump.pcap"
        bottle.response.set_header("Content-Disposition", f'attachment; filename="flag-{flag_id}.pcap"')
        return body

    @app.post("/flags/<flag_id>/release")
    @post
    def release(flag_id):
        return "/flags", actions.release(config_path, db, flag_id)

    @app.post("/flags/ban")
    @post
    def ban():
        f = bottle.request.forms
        return "/flags", actions.ban(config_path, db, f.getunicode("subject") or "", f.getunicode("duration"),
                                     f.getunicode("reason") or "")

    @app.post("/flags/allow")
    @post
    def allow():
        f = bottle.request.forms
        return "/flags", actions.allow(config_path, db, f.getunicode("network") or "", f.getunicode("reason") or "")

    @app.get("/talkers")
    @page
    def talkers(csrf, flash):
        q = bottle.request.query
        try:
            minutes = float(q.get("minutes") or 15)
        except ValueError:
            minutes = 15.0
        minutes = min(max(minutes, 1.0), 7 * 24 * 60.0) if math.isfinite(minutes) else 15.0
        address = (q.getunicode("addr") or "").strip()
        top, fl = data.talkers(cfg, db, minutes, address)
        return pages.talkers(top, fl, minutes, address, csrf, flash)

    @app.get("/switch")
    @page
    def switch(csrf, flash):
        return pages.switch(data.switch(cfg, db), csrf, flash)

    @app.get("/fleet")
    @page
    def fleet(csrf, flash):
        return pages.fleet(data.fleet(cfg, db), cfg.snooper.sensor, csrf, flash)

    @app.get("/api/fleet")
    @api
    def fleet_json():
        f = data.fleet(cfg, db)
        return {"html": pages.fleet_html(f, cfg.snooper.sensor), "ok": f["ok"], "fleet": f}

    @app.get("/static/<name>")
    def static(name):
        path = STATIC / name
        if "/" in name or not path.is_file():
            bottle.abort(404, "no such file")
        bottle.response.content_type = STATIC_TYPES.get(path.suffix, "application/octet-stream")
        bottle.response.set_header("Cache-Control", "max-age=3600")
        return path.read_bytes()

    return secure_headers(app)
