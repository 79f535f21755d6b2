"""appliance.timespec: every accepted form exactly, every bad form one BadInput line; then through the real
``export-pcap`` (which frames it selects), ``report`` and ``analyser --once`` (the times their titles show)."""

from __future__ import annotations

import datetime as dt
import re
import time

import pytest

from appliance import pcapfile, timespec
from appliance.errors import BadInput
from tests.analyser_frames import S, store_frames
from tests.conftest import pisnoop

UTC = dt.timezone.utc
NOW = 1714564800_250000000  # 2024-05-01T12:00:00.25Z
NOON = 1714564800 * S
FORMS = ("expected ISO 8601 (2026-11-21T07:00:00Z, UTC if no zone), epoch seconds (1700000000.5), now, "
         "or a span back from now (30m or -30m; s, m, h, d)")


@pytest.mark.parametrize("text,ns", [
    ("now", NOW), (" now ", NOW),
    ("30m", NOW - 1800 * S), ("-30m", NOW - 1800 * S), ("90s", NOW - 90 * S), ("-90s", NOW - 90 * S),
    ("2h", NOW - 7200 * S), ("-1d", NOW - 86400 * S), ("1.5h", NOW - 5400 * S), ("-0.000000001s", NOW - 1),
    ("1714564800", NOON), ("1714564800.5", NOON + S // 2), ("1714564800.000000123", NOON + 123),
    ("1714564800.1234567899", NOON + 123456789), ("0", 0), ("30", 30 * S),  # digits alone: epoch seconds
    ("2024-05-01T12:00:00Z", NOON), ("2024-05-01T12:00:00", NOON), ("2024-05-01T14:00:00+02:00", NOON),
    ("2024-05-01T12:00:00.123456Z", NOON + 123456000), ("2024-05-01 12:00:00", NOON),
    ("2024-05-01", NOON - 12 * 3600 * S),
])
def test_every_accepted_form_gives_exact_ns(text, ns):
    assert timespec.parse(text, now_ns=NOW) == ns


@pytest.mark.parametrize("text", ["", "yesterday", "30x", "--30m", "+30m", "30 m", "m", "1e9", "NaN", "-1714564800",
                                  "1714564800.", "2024-13-01T00:00:00", "12:00"])
def test_a_bad_form_is_one_line_naming_the_option_and_the_forms(text):
    with pytest.raises(timespec.TimeSpecError) as err:
        timespec.parse(text, "--since")
    assert isinstance(err.value, BadInput)
    assert str(err.value) == f"--since {text!r}: {FORMS}"


def test_utc_is_the_aware_datetime_truncated_to_the_microsecond():
    assert timespec.utc(NOON + 123456789) == dt.datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    assert timespec.utc(timespec.parse("2024-05-01T12:00:00.5Z")).isoformat() == "2024-05-01T12:00:00.500000+00:00"


def test_the_clock_is_the_default_now():
    before = time.time_ns()
    got = timespec.parse("-30m")
    assert before - 1800 * S <= got <= time.time_ns() - 1800 * S


# --- through the real command line ---------------------------------------------------------------------

def exported(cfg, tmp_path, *times: str) -> set[int]:
    """The capture times (µs, as export writes them) that ``export-pcap --since/--until`` selects."""
    out = tmp_path / "out.pcap"
    r = pisnoop("--config", str(cfg), "export-pcap", "--sensor", "ts", *times, "-o", str(out))
    assert r.returncode == 0, (times, r.stderr)
    got = {ts for ts, _w, _d in pcapfile.read(out)}
    assert r.stderr.startswith(f"{len(got)} frames"), r.stderr
    return got


def test_export_selects_by_every_form(store_config, tmp_path):
    cfg, db = store_config
    now = time.time_ns() // S * S
    a, b, c = now - 3 * 3600 * S, now - 50 * 60 * S + 123456789, now - 10 * 60 * S
    store_frames(db, [(t, 60, bytes(60)) for t in (a, b, c)], sensor="ts")
    us = {t: t // 1000 * 1000 for t in (a, b, c)}
    iso = timespec.utc(b).isoformat()  # µs: b's last three digits cut, so b stays inside
    cases = {  # "--since -1h" as two words too: the CLI joins a span starting with "-" to its option
        ("--since", "1h"): {b, c}, ("--since=-1h",): {b, c}, ("--since", "-1h"): {b, c},
        ("--since", "-2h", "--until", "-20m"): {b}, ("--since", "30m", "--until", "now"): {c},
        ("--since=-0.5h",): {c}, ("--since", "1d"): {a, b, c}, ("--since", "2h", "--until=-20m"): {b},
        ("--since", f"{b // S}.{b % S:09d}"): {b, c}, ("--since", f"{(b + 1) // S}.{(b + 1) % S:09d}"): {c},
        ("--since", "1d", "--until", f"{b // S}.{b % S:09d}"): {a, b},
        ("--since", iso): {b, c}, ("--since", iso.replace("+00:00", "Z")): {b, c},
        ("--since", iso.replace("+00:00", "")): {b, c},
        ("--since", timespec.utc(b).astimezone(dt.timezone(dt.timedelta(hours=-5))).isoformat()): {b, c},
    }
    for times, want in cases.items():
        assert exported(cfg, tmp_path, *times) == {us[t] for t in want}, times


@pytest.mark.parametrize("args,line", [
    (["--since", "yesterday"], f"--since 'yesterday': {FORMS}"),
    (["--since", "+30m"], f"--since '+30m': {FORMS}"),
    (["--since", "1h", "--until", "30 m"], f"--until '30 m': {FORMS}"),
    (["--since", "10m", "--until", "1h"], "export-pcap: --until is before --since"),
])
def test_export_refuses_a_bad_time_with_one_line(store_config, tmp_path, args, line):
    cfg, _db = store_config
    r = pisnoop("--config", str(cfg), "export-pcap", *args, "-o", str(tmp_path / "o.pcap"))
    assert (r.returncode, r.stdout, r.stderr) == (2, "", f"pisnoop: {line}\n")
    assert not (tmp_path / "o.pcap").exists()


def shown(text: str, pattern: str) -> list[int]:
    """The ``%Y-%m-%d %H:%M:%S`` UTC times ``pattern`` finds in a report, as epoch seconds."""
    return [int(dt.datetime.strptime(t, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp())
            for t in re.search(pattern, text).groups()]


@pytest.mark.parametrize("since,want", [
    ("2024-05-01T12:00:00Z", 1714564800), ("2024-05-01T12:00:00", 1714564800),
    ("2024-05-01T12:00:00-04:00", 1714564800 + 4 * 3600), ("1714564800.999", 1714564800),
    ("now", 0), ("30m", 1800), ("-30m", 1800), ("-1.5d", 129600),
])
def test_report_since_every_form(store_config, tmp_path, since, want):
    cfg, _db = store_config
    before = time.time()
    r = pisnoop("--config", str(cfg), "report", f"--since={since}", "-o", str(tmp_path / "rep"))
    after = time.time()
    assert r.returncode == 0, r.stderr
    [got] = shown(r.stdout, r"since (\S+ \S+) UTC")
    if want > 1_000_000_000:
        assert got == want
    else:  # a span back from the command's own clock
        assert int(before) - want - 1 <= got <= after - want + 1, (got, before, want)


@pytest.mark.parametrize("args,line", [
    (["--since", "yesterday"], f"--since 'yesterday': {FORMS}"),
    (["--since", "30x"], f"--since '30x': {FORMS}"),
    (["--until", "1e9"], f"--until '1e9': {FORMS}"),
])
def test_report_refuses_a_bad_time_with_one_line(store_config, args, line):
    cfg, _db = store_config
    r = pisnoop("--config", str(cfg), "report", *args)
    assert (r.returncode, r.stdout, r.stderr) == (2, "", f"pisnoop: {line}\n")


def test_analyser_once_range_takes_the_same_forms(store_config):
    cfg, _db = store_config
    r = pisnoop("--config", str(cfg), "analyser", "--once", "--since", "1714564800", "--until", "2024-05-01T13:00:00Z")
    assert r.returncode == 0, r.stderr
    assert shown(r.stdout, r"from (\S+ \S+) to (\S+ \S+) ") == [1714564800, 1714564800 + 3600]
    r = pisnoop("--config", str(cfg), "analyser", "--once", "--since", "yesterday")
    assert (r.returncode, r.stdout, r.stderr) == (2, "", f"pisnoop: --since 'yesterday': {FORMS}\n")
