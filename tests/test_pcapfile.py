"""appliance.pcapfile: every format case on files the tests write byte by byte (and tcpdump and dpkt
cross-check), then the three commands that use it (import-pcap, export-pcap, analyse --pcap) on real files."""

from __future__ import annotations

import io
import json
import re
import struct
import subprocess

import dpkt
import pytest

from appliance import pcapfile
from appliance.errors import BadInput
from tests.analyser_frames import T0, Conn, S, steady
from tests.conftest import pisnoop

FAST = "10.0.0.10"


# --- files written by the tests, from the format specifications ---------------------------------------

def classic(records, nano=False, order="<", linktype=1, snaplen=262144) -> bytes:
    """A classic pcap of ``(sec, frac, data, orig_len)`` records."""
    out = struct.pack(order + "IHHiIII", 0xA1B23C4D if nano else 0xA1B2C3D4, 2, 4, 0, 0, snaplen, linktype)
    for sec, frac, data, wire in records:
        out += struct.pack(order + "IIII", sec, frac, len(data), wire) + data
    return out


def block(btype: int, body: bytes, order="<") -> bytes:
    body += b"\0" * (-len(body) % 4)
    return struct.pack(order + "II", btype, len(body) + 12) + body + struct.pack(order + "I", len(body) + 12)


def shb(order="<", major=1) -> bytes:
    return block(0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, major, 0, -1), order)


def option(code: int, value: bytes, order="<") -> bytes:
    return struct.pack(order + "HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def idb(order="<", linktype=1, snaplen=0, tsresol: int | None = None, tsoffset: int | None = None) -> bytes:
    opts = b""
    if tsresol is not None:
        opts += option(9, bytes([tsresol]), order)
    if tsoffset is not None:
        opts += option(14, struct.pack(order + "q", tsoffset), order)
    if opts:
        opts += option(0, b"", order)
    return block(1, struct.pack(order + "HHI", linktype, 0, snaplen) + opts, order)


def epb(units: int, data: bytes, wire: int | None = None, iface=0, order="<") -> bytes:
    wire = len(data) if wire is None else wire
    return block(6, struct.pack(order + "IIIII", iface, units >> 32, units & 0xFFFFFFFF, len(data), wire) + data, order)


def spb(data: bytes, wire: int | None = None, order="<") -> bytes:
    return block(3, struct.pack(order + "I", len(data) if wire is None else wire) + data, order)


def records(blob: bytes, name="x.pcap") -> list:
    return list(pcapfile.read_stream(io.BytesIO(blob), name))


def tcpdump(path, *opts) -> list[str]:
    """One line per packet as tcpdump reads the file (its hex-dump lines are indented)."""
    td = subprocess.run(["tcpdump", "-n", *opts, "-r", str(path)], capture_output=True, text=True)
    assert td.returncode == 0, td.stderr
    return [ln for ln in td.stdout.splitlines() if ln and not ln[0].isspace()]


# --- classic pcap --------------------------------------------------------------------------------------

@pytest.mark.parametrize("nano,order", [(False, "<"), (True, "<"), (False, ">"), (True, ">")])
def test_classic_keeps_time_and_wire_length(nano, order):
    recs = [(1700000000, 123456789 if nano else 123456, b"\x01" * 20, 20), (1700000001, 5, b"\x02" * 30, 1500)]
    scale = 1 if nano else 1000
    want = [(sec * S + frac * scale, wire, data) for sec, frac, data, wire in recs]
    assert records(classic(recs, nano, order)) == want


def test_classic_wire_length_is_the_orig_len_as_written_both_ways():
    short, padded = b"\x03" * 40, b"\x04" * 60
    got = records(classic([(1, 0, short, 60), (2, 0, padded, 40)]))
    assert got == [(S, 60, short), (2 * S, 40, padded)]


def test_a_file_dpkt_wrote_reads_as_dpkt_meant():
    for nano in (False, True):
        out = io.BytesIO()
        dpkt.pcap.Writer(out, snaplen=65535, nano=nano).writepkt(b"\x05" * 50, ts=1700000000.25)
        assert records(out.getvalue()) == [(1700000000 * S + 250_000_000, 50, b"\x05" * 50)]
    out = io.BytesIO()
    dpkt.pcapng.Writer(out, snaplen=65535, linktype=1).writepkt(b"\x03" * 50, ts=1700000000.25)
    assert records(out.getvalue()) == [(1700000000 * S + 250_000_000, 50, b"\x03" * 50)]


# --- pcapng --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("tsresol,units_per_s", [(None, 10**6), (6, 10**6), (9, 10**9), (3, 10**3),
                                                 (0x80 | 10, 2**10), (0x80 | 30, 2**30)])
def test_pcapng_resolutions_give_exact_ns(order, tsresol, units_per_s):
    units = [1700000000 * units_per_s + k * 7 + 1 for k in range(3)]
    blob = shb(order) + idb(order, tsresol=tsresol) + b"".join(epb(u, bytes([k]) * 42, order=order)
                                                                 for k, u in enumerate(units))
    assert records(blob) == [(u * S // units_per_s, 42, bytes([k]) * 42) for k, u in enumerate(units)]


def test_pcapng_finer_than_ns_truncates_and_tsoffset_adds_seconds():
    blob = shb() + idb(tsresol=12, tsoffset=-3600) + epb(1_000_000_123456789_999, b"\x01" * 42)
    assert records(blob) == [((1_000_000 - 3600) * S + 123456789, 42, b"\x01" * 42)]


def test_pcapng_tcpdump_reads_the_tests_files_the_same(tmp_path):
    units = [1700000000_123456789, 1700000000_987654321]
    path = tmp_path / "ns.pcapng"
    path.write_bytes(shb(">") + idb(">", tsresol=9) + b"".join(epb(u, b"\x02" * 60, order=">") for u in units))
    stamps = [ln.split()[0] for ln in tcpdump(path, "-tt", "--time-stamp-precision=nano")]
    assert stamps == [f"{u // S}.{u % S:09d}" for u in units]
    assert [ts for ts, _w, _d in pcapfile.read(path)] == units


def test_pcapng_epb_caplen_below_orig_len_keeps_orig_len():
    assert records(shb() + idb() + epb(5, b"\x01" * 40, wire=1500)) == [(5000, 1500, b"\x01" * 40)]


def test_pcapng_sections_interfaces_unknown_blocks_and_simple_packets():
    a = shb("<") + idb("<", tsresol=9) + idb("<", snaplen=50)             # interface 0 ns, 1 µs
    a += block(0x40000BAD, b"custom block, skipped") + block(4, b"\0" * 4)  # custom and name-resolution blocks
    a += epb(7_000_000_123, b"\x01" * 42, iface=0) + epb(8_000_000, b"\x02" * 42, iface=1)
    a += spb(b"\x03" * 60, wire=60)                                        # no time: the packet before it's
    b = shb(">") + idb(">", snaplen=50) + spb(b"\x04" * 60, order=">")    # new section: new order, interfaces
    b += epb(9_000_000, b"\x05" * 42, order=">")
    old_pb = block(2, struct.pack("<HHIIII", 0, 0, 0, 10_000_000, 42, 100) + b"\x06" * 42)  # the obsolete PB
    c = shb("<") + idb("<") + old_pb
    assert records(a + b + c) == [(7 * S + 123, 42, b"\x01" * 42), (8 * S, 42, b"\x02" * 42), (8 * S, 60, b"\x03" * 60),
                                  (8 * S, 60, b"\x04" * 50), (9 * S, 42, b"\x05" * 42), (10 * S, 100, b"\x06" * 42)]


def test_reading_needs_no_seek(tmp_path):
    path = tmp_path / "x.pcapng"
    path.write_bytes(shb() + idb(tsresol=9) + epb(1700000000_000000001, b"\x01" * 42))
    with subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE) as cat:
        assert list(pcapfile.read_stream(cat.stdout, "pipe")) == [(1700000000_000000001, 42, b"\x01" * 42)]


# --- what is refused -----------------------------------------------------------------------------------

GOOD = classic([(1, 0, b"\x01" * 40, 40), (2, 0, b"\x02" * 40, 40)])
NG = shb() + idb()


@pytest.mark.parametrize("blob,message", [
    (b"", "not a capture file (too short)"),
    (b"\xd4\xc3", "not a capture file (too short)"),
    (b"hello world, not a capture file", "not a pcap or pcapng file (magic 68656c6c)"),
    (GOOD[:20], "truncated file header"),
    (GOOD[:24 + 10], "truncated record header at byte 24"),
    (GOOD[:-3], "truncated record at byte 80"),
    (classic([]) + struct.pack("<IIII", 1, 0, 262145, 40),
     "record at byte 24 claims 262145 captured bytes (at most 262144)"),
    (classic([], linktype=101), "link type 101 (expected 1, Ethernet)"),
    (classic([], linktype=101, order=">"), "link type 101 (expected 1, Ethernet)"),
    (shb() + idb(linktype=101) + epb(1, b"\x01" * 42), "interface 0: link type 101 (expected 1, Ethernet)"),
    (NG + idb(linktype=1) + idb(linktype=228) + epb(1, b"\x01" * 42, iface=2), "interface 2: link type 228"),
    (NG + epb(1, b"\x01" * 42, iface=1), "packet of interface 1, which its section does not describe"),
    (shb() + epb(1, b"\x01" * 42), "packet of interface 0, which its section does not describe"),
    (NG + shb() + epb(1, b"\x01" * 42), "block at byte 76: packet of interface 0, which its section does not"),
    (NG + epb(1, b"\x01" * 42)[:-5], "truncated block at byte 48"),
    (NG + b"\x06\0\0\0\x10", "truncated block header at byte 48"),
    (NG + struct.pack("<II", 6, 14) + b"\0" * 8, "bad block length 14 at byte 48"),
    (NG + struct.pack("<II", 6, 8) + b"\0" * 8, "bad block length 8 at byte 48"),
    (NG + struct.pack("<II", 6, 2**30) + b"\0" * 8, f"bad block length {2**30} at byte 48"),
    (NG + epb(1, b"\x01" * 40)[:-4] + struct.pack("<I", 99), "bad block length at byte 48 (72 at the start, 99 at"),
    (NG + block(6, struct.pack("<IIIII", 0, 0, 1, 400, 400) + b"\x01" * 40), "packet of 400 bytes does not fit"),
    (NG + block(6, b"\0" * 12), "block at byte 48: packet too short"),
    (shb()[:8] + b"\x11\x22\x33\x44" + shb()[12:], "bad byte-order magic 11223344 in the section header at byte 0"),
    (shb(major=2), "pcapng version 2.0 (expected 1.x)"),
    (block(0x0A0D0D0A, struct.pack("<I", 0x1A2B3C4D)), "bad block length 16 at byte 0"),
    (NG + block(1, b"\x01\0"), "interface description too short"),
    (NG + block(1, struct.pack("<HHI", 1, 0, 0) + struct.pack("<HH", 9, 8) + b"\x09"), "option 9 runs past the block"),
])
def test_what_is_not_a_readable_ethernet_capture_is_one_pcap_error(blob, message):
    with pytest.raises(pcapfile.PcapError) as err:
        records(blob, "x.pcap")
    assert isinstance(err.value, BadInput)
    text = str(err.value)
    assert text.startswith("x.pcap: ") and message in text and "\n" not in text, text


def test_records_before_a_fault_are_given_first():
    reader = pcapfile.read_stream(io.BytesIO(GOOD[:-3]), "x.pcap")
    assert next(reader) == (S, 40, b"\x01" * 40)
    with pytest.raises(pcapfile.PcapError, match="truncated record at byte 80"):
        next(reader)


def test_an_unused_non_ethernet_interface_is_no_fault():
    assert records(NG + idb(linktype=101) + epb(3, b"\x01" * 42)) == [(3000, 42, b"\x01" * 42)]


def test_read_names_a_file_it_cannot_open(tmp_path):
    with pytest.raises(pcapfile.PcapError, match=f"^{re.escape(str(tmp_path))}/nope.pcap: No such file or directory$"):
        list(pcapfile.read(tmp_path / "nope.pcap"))


# --- the writer ----------------------------------------------------------------------------------------

FRAMES = [(1700000000_123456789, 60, b"\x01" * 60), (1700000001_000000999, 1500, b"\x02" * 80),
          (1700000002_000000005, 40, b"\x03" * 60)]


@pytest.mark.parametrize("nano", [False, True])
def test_writer_writes_stored_time_and_wire_length_as_they_are(tmp_path, nano):
    path = tmp_path / "w.pcap"
    with open(path, "wb") as fh:
        w = pcapfile.Writer(fh, nano=nano)
        for f in FRAMES:
            w.write(*f)
    blob = path.read_bytes()
    assert blob[:24] == struct.pack("<IHHiIII", 0xA1B23C4D if nano else 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1)
    off, heads = 24, []
    while off < len(blob):
        sec, frac, caplen, wire = struct.unpack_from("<IIII", blob, off)
        heads.append((sec, frac, caplen, wire))
        off += 16 + caplen
    assert heads == [(ts // S, ts % S if nano else ts % S // 1000, len(d), w) for ts, w, d in FRAMES]
    unit = 1 if nano else 1000
    assert list(pcapfile.read(path)) == [(ts // unit * unit, w, d) for ts, w, d in FRAMES]
    assert len(tcpdump(path)) == len(FRAMES)


# --- the three commands on real files ------------------------------------------------------------------

def flow_frames(t0: int):
    """A client's TCP connection: handshake, ten 1000-byte payloads captured only in their first 80 bytes
    (caplen < len), and one ACK captured with Ethernet padding beyond its stated length (caplen > len)."""
    c = Conn(FAST, 40000)
    out = c.handshake(t0)
    for k in range(10):
        ts, wire, data = c.data(t0 + (k + 1) * 10_000_000, b"x" * 1000)[0]
        out.append((ts, wire, data[:80]))
    ts, wire, data = c.fin(t0 + S)[2]
    out.append((ts, wire, data + b"\0" * 6))
    return out


def talker_bytes(report: str, ip: str) -> tuple[int, int]:
    """(packets, bytes) of ``ip`` in a report's top-talkers table."""
    line = next(ln for ln in report.splitlines() if ln.split()[:1] == [ip])
    _ip, _flows, packets, nbytes = line.split()[:4]          # then xmpp, verified and unverified packets
    return int(packets), int(nbytes)


def test_wire_length_kept_through_import_export_and_analyse(store_config, tmp_path):
    cfg, _db = store_config
    frames = flow_frames(T0)
    assert any(w > len(d) for _t, w, d in frames) and any(w < len(d) for _t, w, d in frames)
    src = tmp_path / "in.pcap"
    src.write_bytes(classic([(ts // S, ts % S // 1000, d, w) for ts, w, d in frames]))
    r = pisnoop("--config", str(cfg), "import-pcap", str(src), "--sensor", "wl")
    assert r.returncode == 0 and f"stored {len(frames)}, duplicates 0, unreadable records 0" in r.stdout, r.stderr
    out = tmp_path / "out.pcap"
    r = pisnoop("--config", str(cfg), "export-pcap", "--sensor", "wl", "--since", f"{T0 // S - 1}", "-o", str(out))
    assert r.returncode == 0 and r.stderr == f"{len(frames)} frames written to {out}\n", r.stderr
    assert [(w, len(d)) for _t, w, d in pcapfile.read(out)] == [(w, len(d)) for _t, w, d in frames]
    assert out.read_bytes() == src.read_bytes()
    assert len(tcpdump(out)) == len(frames)
    r = pisnoop("--config", str(cfg), "analyse", "--pcap", str(src))
    assert r.returncode == 0, r.stderr
    assert talker_bytes(r.stdout, FAST) == (len(frames), sum(w for _t, w, _d in frames))


@pytest.mark.parametrize("resolution,order", [("ns", ">"), ("us", "<")])
def test_pcapng_times_exact_through_import_store_export_and_analyse(store_config, tmp_path, resolution, order):
    cfg, _db = store_config
    frames = steady(Conn(FAST, 40000), T0, 600, 60)  # fast enough to be flagged: the flag carries packet times
    frames = [(ts + 123_456_789 if resolution == "ns" else ts + 654_321_000, w, d) for ts, w, d in frames]
    unit = 1 if resolution == "ns" else 1000
    src = tmp_path / f"{resolution}.pcapng"
    src.write_bytes(shb(order) + idb(order, tsresol=9 if resolution == "ns" else None)
                    + b"".join(epb(ts // unit, d, w, order=order) for ts, w, d in frames))
    r = pisnoop("--config", str(cfg), "import-pcap", str(src), "--sensor", resolution)
    assert r.returncode == 0 and f"stored {len(frames)}," in r.stdout, r.stderr
    for flag, keep in (("--ns", 1), (None, 1000)):
        out = tmp_path / f"out{keep}.pcap"
        r = pisnoop("--config", str(cfg), "export-pcap", "--sensor", resolution, "--since", f"{T0 // S}",
                    "-o", str(out), *([flag] if flag else []))
        assert r.returncode == 0, r.stderr
        assert list(pcapfile.read(out)) == [(ts // keep * keep, w, d) for ts, w, d in frames]
    r = pisnoop("--config", str(cfg), "analyse", "--pcap", str(src), "--json")
    assert r.returncode == 0, r.stderr
    flags = [json.loads(line) for line in r.stdout.splitlines()]
    stamps = {ts for ts, _w, _d in frames}
    assert flags and all(f["client_ip"] == FAST for f in flags)
    for f in flags:
        assert {f["evidence"]["first_packet_ns"], f["evidence"]["last_packet_ns"]} <= stamps


BAD_FILES = {
    "link.pcap": (classic([(1, 0, b"\x01" * 42, 42)], linktype=101), "link type 101 (expected 1, Ethernet)"),
    "link.pcapng": (shb() + idb(linktype=101) + epb(1, b"\x01" * 42),
                    "interface 0: link type 101 (expected 1, Ethernet)"),
    "garbage.pcap": (b"GET / HTTP/1.1\r\nHost: example\r\n\r\n", "not a pcap or pcapng file (magic 47455420)"),
    "cut.pcap": (GOOD[:24 + 20], "truncated record at byte 24"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_a_file_that_is_not_an_ethernet_capture_is_refused_by_every_command(store_config, tmp_path, name):
    cfg, _db = store_config
    blob, message = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(blob)
    for args in (["import-pcap", str(path), "--sensor", "bad"], ["analyse", "--pcap", str(path)]):
        r = pisnoop("--config", str(cfg), *args)
        assert (r.returncode, r.stdout, r.stderr) == (2, "", f"pisnoop: {path}: {message}\n"), args
    r = pisnoop("--config", str(cfg), "export-pcap", "--sensor", "bad", "--since", "0", "-o", str(tmp_path / "o.pcap"))
    assert r.returncode == 0 and r.stderr.startswith("0 frames"), r.stderr  # the refused import stored nothing
    assert (tmp_path / "o.pcap").read_bytes() == classic([])


def test_import_keeps_the_frames_before_a_fault_later_in_the_file(store_config, tmp_path):
    cfg, _db = store_config
    path = tmp_path / "cut.pcap"
    path.write_bytes(GOOD[:-3])
    r = pisnoop("--config", str(cfg), "import-pcap", str(path), "--sensor", "cut")
    assert r.returncode == 0 and "read 1 frames, stored 1, duplicates 0, unreadable records 1" in r.stdout, r.stderr
    assert f"stopped reading: {path}: truncated record at byte 80" in r.stderr
