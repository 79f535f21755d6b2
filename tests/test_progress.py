"""Progress on long work: a line on a terminal (frames, rate, time left), nothing when piped or under systemd, and
the same summary either way (import-pcap, analyse --pcap, export-pcap through a pseudo-terminal)."""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import sys
import threading
import time

from appliance import pcapfile, progress
from tests.analyser_frames import T0, Conn, steady
from tests.conftest import PISNOOP, REPO

FRAMES = 6000


def test_the_line_says_frames_rate_fraction_and_time_left_and_is_erased():
    out = io.StringIO()
    p = progress.Progress("import-pcap", total=1000, stream=out, every=0.0, enabled=True)
    p.start -= 2.0                                    # two seconds in
    p.update(5000, 250)
    text = out.getvalue()
    assert text.startswith(progress.ERASE) and "import-pcap: 5,000 frames, " in text
    rate = float(re.search(r"([0-9,]+) frames/s", text).group(1).replace(",", ""))
    assert 2400 <= rate <= 2500, text
    assert ", 25 %, 6 s left" in text, text                                 # a quarter in 2 s: 6 s to go
    p.done()
    assert out.getvalue().endswith(progress.ERASE)


def test_at_most_one_line_per_interval_and_nothing_when_not_a_terminal():
    out = io.StringIO()
    p = progress.Progress("x", stream=out, every=60.0, enabled=True)
    for i in range(1000):
        p.update(i)
    assert p.drawn == 1 and out.getvalue().count(progress.ERASE) == 1 and "%" not in out.getvalue()
    quiet = io.StringIO()
    q = progress.Progress("x", total=10, stream=quiet)      # a StringIO is no terminal
    q.update(5, 5)
    q.done()
    assert not q.enabled and quiet.getvalue() == ""


def write_pcap(path) -> None:
    frames = []
    for i in range(FRAMES // 600 + 1):
        frames += steady(Conn(f"10.0.0.{10 + i}", 40000 + i), T0 + i * 10**9, 600, 60)
    frames.sort(key=lambda f: f[0])
    with open(path, "wb") as fh:
        w = pcapfile.Writer(fh)
        for ts, wire, data in frames[:FRAMES]:
            w.write(ts, wire, data)


def run(args, tty: bool, extra_env: dict | None = None) -> tuple[int, str, str]:
    """The command with stderr on a pseudo-terminal (``tty``) or a pipe; (exit code, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if k not in ("INVOCATION_ID", "JOURNAL_STREAM", "PISNOOP_CONFIG")}
    env.update(extra_env or {})
    if not tty:
        res = subprocess.run([*PISNOOP, *args], capture_output=True, text=True, env=env, cwd=str(REPO), timeout=120)
        return res.returncode, res.stdout, res.stderr
    master, slave = pty.openpty()
    proc = subprocess.Popen([*PISNOOP, *args], stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL,
                            env=env, cwd=str(REPO), text=True)
    os.close(slave)
    got = []

    def reader():
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                return
            if not chunk:
                return
            got.append(chunk)
    t = threading.Thread(target=reader, daemon=True)
    t.start()
    stdout, _ = proc.communicate(timeout=120)
    t.join(5)
    os.close(master)
    return proc.returncode, stdout, b"".join(got).decode(errors="replace")


def test_analyse_pcap_shows_progress_on_a_terminal_only_and_prints_the_same_report(tmp_path):
    pcap = tmp_path / "big.pcap"
    write_pcap(pcap)
    rc_t, out_t, err_t = run(["analyse", "--pcap", str(pcap)], tty=True)
    rc_p, out_p, err_p = run(["analyse", "--pcap", str(pcap)], tty=False)
    rc_s, out_s, err_s = run(["analyse", "--pcap", str(pcap)], tty=True, extra_env={"INVOCATION_ID": "x"})
    assert rc_t == rc_p == rc_s == 0, (err_t, err_p)
    def clockless(text):                  # the report's flags carry the wall-clock time they were raised at
        return re.sub(r"\d\d:\d\d:\d\d(\.\d+)?", "T", text)
    assert clockless(out_t) == clockless(out_p) == clockless(out_s) and "flag" in out_p
    assert "analyse: 1,000 frames, " in err_t and " % " in err_t.replace(",", " ") and " left" in err_t, err_t
    assert err_t.endswith(progress.ERASE), repr(err_t[-80:])
    for quiet in (err_p, err_s):
        assert "frames/s" not in quiet and "\r" not in quiet, quiet


def test_import_and_export_pcap_show_progress_on_a_terminal_with_the_same_summary(store_config, tmp_path):
    path, db = store_config
    pcap = tmp_path / "big.pcap"
    write_pcap(pcap)
    rc_t, out_t, err_t = run(["--config", str(path), "import-pcap", str(pcap)], tty=True)
    rc_p, out_p, err_p = run(["--config", str(path), "import-pcap", str(pcap)], tty=False)
    assert rc_t == rc_p == 0, (err_t, err_p)
    same = re.compile(r"^run import-\S+: ")
    assert same.sub("", out_t) == same.sub("", out_p) == (f"read {FRAMES} frames, stored {FRAMES}, duplicates 0, "
                                                          "unreadable records 0, waiting in the spool 0\n")
    assert re.search(r"import-pcap: [0-9,]+ frames, [0-9,]+ frames/s, \d+ %", err_t), err_t
    assert "frames/s" not in err_p
    since = str((T0 // 10**9) - 1)
    start = time.monotonic()
    rc_t, _o, err_t = run(["--config", str(path), "export-pcap", "--since", since, "-o", str(tmp_path / "a.pcap")],
                          tty=True)
    rc_p, _o, err_p = run(["--config", str(path), "export-pcap", "--since", since, "-o", str(tmp_path / "b.pcap")],
                          tty=False)
    assert rc_t == rc_p == 0 and time.monotonic() - start < 120
    assert (tmp_path / "a.pcap").read_bytes() == (tmp_path / "b.pcap").read_bytes()
    assert err_p == f"{2 * FRAMES} frames written to {tmp_path / 'b.pcap'}\n"
    assert "export-pcap: 1,024 frames, " in err_t and err_t.endswith(f"{2 * FRAMES} frames written to "
                                                                     f"{tmp_path / 'a.pcap'}\r\n"), repr(err_t[-200:])
    assert sys.executable
