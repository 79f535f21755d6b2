"""The numbers of docs/FLEET.md: BSON sizes of pisnoop's real documents, scaled to N appliances at R Mb/s.

Every size is measured on a document the code builds (``store.batch_document`` with the snooper's batch size,
a flow record from ``FlowTable`` after a real TCP exchange, ``flagdoc.build``; the status documents a running
appliance writes: the sizes measured in the fleet auth test, listed below). Rates are the arithmetic the note
explains; nothing here is a throughput claim.

    python bench/fleet_sizing.py [--appliances 100] [--mbps 100] [--frame-bytes 64 500 1500] [--active-flows 500]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bson  # noqa: E402

from analyser.flows import FlowTable, MemoryFlows  # noqa: E402
from analyser.parse import parse  # noqa: E402
from appliance import config, flagdoc, store  # noqa: E402
from tests.analyser_frames import T0, Conn, S  # noqa: E402

# status documents of a running appliance (bytes of BSON), read back from the store in tests/test_fleet_auth.py's
# run (the analyser's grows with its neighbours and unverified sources, to ~3 KB)
STATUS_BYTES = {"snooper": 1072, "analyser": 1013, "controller": 902}


def frames_doc(frame_bytes: int, batch: int) -> int:
    frames = [(T0 + i * 1000, frame_bytes, bytes(frame_bytes)) for i in range(batch)]
    doc = store.batch_document("site-001", "r1", 1, frames)
    doc["ins"] = dt.datetime.now(dt.timezone.utc)
    return len(bson.encode(doc))


def flow_doc() -> int:
    table = FlowTable(MemoryFlows(), "site-001", 0, (5222,))
    c = Conn("10.0.0.10", 40000)
    frames = c.handshake(T0)
    for i in range(1, 20):
        frames += c.data(T0 + i * S // 10) + c.data(T0 + i * S // 10 + 1000, to_server=False)
    for ts, wl, data in frames:
        p = parse(ts, wl, data)
        table.update(p, "b1")
    table.flush(1)
    docs = table.sink.docs.values()
    return max(len(bson.encode(d)) for d in docs)


def flag_doc() -> int:
    now = dt.datetime.now(dt.timezone.utc)
    doc = flagdoc.build(client_ip="10.0.0.10", server_ports=[5222, 5223], classifier="xmpp_abuse",
                        reason="312 packets in 60 s (threshold 300/min)", action="drop",
                        evidence={"count": 312, "window_seconds": 60, "first_packet": now, "last_packet": now,
                                  "threshold": 300, "connections": 4}, offence=1, ban_seconds=300, flagged_at=now,
                        sensor="site-001", scope=flagdoc.FLEET)
    return len(bson.encode(doc))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--appliances", type=int, default=100)
    ap.add_argument("--mbps", type=float, default=100.0)
    ap.add_argument("--frame-bytes", type=int, nargs="+", default=[64, 500, 1500])
    ap.add_argument("--active-flows", type=int, default=500, help="flows with a packet in each analyser pass")
    args = ap.parse_args()
    cfg = config.Config()
    batch, interval = cfg.snooper.batch_size, cfg.snooper.batch_interval
    passes = 1 / cfg.analyser.poll_interval
    n, bps = args.appliances, args.mbps * 1e6 / 8
    flow, flag = flow_doc(), flag_doc()
    print(f"{n} appliances at {args.mbps:g} Mb/s mirrored each; batch {batch} frames or {interval} s; "
          f"analyser pass every {cfg.analyser.poll_interval} s; flow record {flow} B, flag {flag} B")
    print(f"{'frame B':>8} {'frames/s/appl':>14} {'frames docs/s':>14} {'doc KB':>8} {'frames MB/s':>12} "
          f"{'flows docs/s':>13} {'flows MB/s':>11} {'all docs/s':>11} {'all MB/s':>9} {'GB/day':>8}")
    for size in args.frame_bytes:
        fps = bps / (size + 4)                        # + 4: the Ethernet FCS the wire carries, the mirror does not
        docs = max(fps / batch, 1 / interval)         # a batch closes at batch_size frames or batch_interval
        per_doc = frames_doc(size, min(batch, max(1, int(fps * interval))))
        frames_mb = n * docs * per_doc / 1e6
        flows_docs = n * args.active_flows * passes
        flows_mb = flows_docs * flow / 1e6
        status_docs = n * (1 / cfg.snooper.status_interval * 2 + 1 / cfg.analyser.status_interval)
        status_mb = n * (STATUS_BYTES["snooper"] / cfg.snooper.status_interval + STATUS_BYTES["controller"]
                         / cfg.snooper.status_interval + STATUS_BYTES["analyser"] / cfg.analyser.status_interval) / 1e6
        flags_docs = n / 60                            # one flag a minute per appliance: an attack, not the norm
        all_docs = n * docs + flows_docs + status_docs + flags_docs
        all_mb = frames_mb + flows_mb + status_mb + flags_docs * flag / 1e6
        print(f"{size:>8} {fps:>14,.0f} {n * docs:>14,.0f} {per_doc / 1e3:>8,.0f} {frames_mb:>12,.1f} "
              f"{flows_docs:>13,.0f} {flows_mb:>11,.1f} {all_docs:>11,.0f} {all_mb:>9,.1f} "
              f"{all_mb * 86400 / 1e3:>8,.0f}")
    print(f"status: {status_docs:,.0f} docs/s, {status_mb:.2f} MB/s; flags (1/min/appliance): {flags_docs:.1f} docs/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
