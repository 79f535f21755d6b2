"""The dashboard's test helpers: a headless Chromium (Debian's chromium and chromedriver, selenium), a client
without a browser (urllib, its own cookies), page weights, screenshots, stopping ``pisnoop web``."""

from __future__ import annotations

import contextlib
import http.cookiejar
import re
import signal
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests import ctlutil

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

def browser_ready() -> bool:
    return Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()


needs_browser = pytest.mark.skipif(not browser_ready(),
                                   reason="chromium and chromium-driver are not installed (setup.sh installs them)")


@contextlib.contextmanager
def chromium(downloads: Path):
    """A headless Chromium driven by chromedriver, downloading into ``downloads``, its console log kept."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000",
                "--no-first-run", "--disable-background-networking", "--disable-component-update"):
        opts.add_argument(arg)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


def browser_login(d, base: str, password: str) -> None:
    """Log the browser in through the login form; back on the overview."""
    from selenium.webdriver.common.by import By
    if not d.current_url.endswith("/login") and "/login?" not in d.current_url:
        d.get(base + "/login")
    d.find_element(By.ID, "password").send_keys(password)
    d.find_element(By.ID, "login-button").click()
    wait(lambda: d.find_elements(By.ID, "tiles"), what="the overview after login")


def severe_console(d) -> list[str]:
    """The browser console's errors (a CSP violation, a script error), the missing favicon aside."""
    return [e["message"] for e in d.get_log("browser")
            if e["level"] == "SEVERE" and "favicon.ico" not in e["message"]]


def stop_web(services) -> None:
    """SIGTERM to the ``web`` service of a ``lab.scenario.ServiceSet`` (its ``stop`` ends the three others)."""
    web = services.procs.pop("web", None)
    if web is not None and web.poll() is None:
        web.send_signal(signal.SIGTERM)
        web.wait(timeout=20)


def wait(pred, timeout: float = 30.0, step: float = 0.25, what: str = ""):
    got = ctlutil.wait_for(pred, timeout, step)
    assert got, f"timed out after {timeout:.0f} s waiting for {what or pred}"
    return got


def shot(driver, out: Path, name: str) -> Path:
    path = out / f"{name}.png"
    driver.get_screenshot_as_file(str(path))
    print(f"screenshot: {path}")
    return path


class Client:
    """The dashboard seen without a browser (urllib, its own cookies): forged posts and page weights."""

    def __init__(self, base: str):
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect)
        self.set_cookies: list[str] = []      # the last POST's Set-Cookie headers, as sent

    def request(self, path: str, method: str) -> tuple[int, dict, bytes]:
        try:
            with self.opener.open(urllib.request.Request(self.base + path, method=method), timeout=30) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def get(self, path: str) -> tuple[int, dict, bytes]:
        try:
            with self.opener.open(self.base + path, timeout=30) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def post(self, path: str, fields: dict) -> tuple[int, dict, bytes]:
        data = urllib.parse.urlencode(fields).encode()
        try:
            with self.opener.open(urllib.request.Request(self.base + path, data=data), timeout=30) as r:
                self.set_cookies = r.headers.get_all("Set-Cookie") or []
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as exc:
            self.set_cookies = exc.headers.get_all("Set-Cookie") or []
            return exc.code, dict(exc.headers), exc.read()

    def login(self, password: str) -> int:
        _s, _h, body = self.get("/login")
        token = re.search(rb'name="csrf" value="([^"]+)"', body).group(1).decode()
        status, headers, _b = self.post("/login", {"csrf": token, "password": password})
        return status if headers.get("Location", "").endswith("/") else -status

    def csrf(self, path: str) -> str:
        _s, _h, body = self.get(path)
        return re.search(rb'name="csrf" value="([^"]+)"', body).group(1).decode()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **kw):
        return None


def page_weight(c: Client, path: str) -> int:
    """Bytes of the page's HTML plus every script and stylesheet it loads, as served."""
    _s, _h, html = c.get(path)
    total = len(html)
    for ref in re.findall(rb'(?:src|href)="(/static/[^"]+)"', html):
        _s2, _h2, body = c.get(ref.decode())
        total += len(body)
    return total


@contextlib.contextmanager
def served(cfg, db):
    """``webui.app.build(cfg, db)`` served in this process on a free port (``pisnoop web``'s server): its base URL."""
    from webui import app as app_mod
    from webui import command
    server = command.serve(app_mod.build(cfg, db), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
