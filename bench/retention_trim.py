"""What retention by size costs the store: removing the oldest batches against storing them.

Batches of 1,000 frames of 200 bytes (as the snooper stores them) go into the
embedded store; then a trim (appliance/retention.py) removes half of them,
oldest first, one ``delete_one`` each so that every removal is counted.
Figures, all in the same run:

* reference: storing the batches (one ``insert_one`` each, the writer's path)
* measuring: one ``Trimmer`` round's reads (collStats, dbStats) with nothing to remove
* trimming: the batches removed per second, and the ratio to storing them

A trim must keep up with capture: removing a batch should cost no more than
storing one.
    PYTHONPATH=. python bench/retention_trim.py [--batches 400]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance import config, retention, store  # noqa: E402
from lab import procs  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=400)
    args = ap.parse_args()
    payload = os.urandom(200)
    with tempfile.TemporaryDirectory() as tmp, procs.EmbeddedStore(Path(tmp) / "store") as es:
        cfg = config.from_dict({"mongodb": {"uri": es.uri, "database": "bench"}})
        db = store.database(cfg.mongodb)
        docs = []
        for seq in range(args.batches):
            doc = store.batch_document("bench", "r", seq, [(seq * 10**9 + i, 200, payload) for i in range(1000)])
            docs.append(doc)
        t0 = time.perf_counter()
        for doc in docs:
            db[store.FRAMES].insert_one({**doc, "ins": dt.datetime.now(dt.timezone.utc)})
        store_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(10):
            retention.measure(db, cfg.mongodb)
        measure_ms = (time.perf_counter() - t0) * 100
        total = retention.frames_bytes(db)
        t0 = time.perf_counter()
        removed = retention.trim(db, total // 2)
        trim_s = time.perf_counter() - t0
        left = db[store.FRAMES].count_documents({})
        db.client.close()
    print(f"stored {args.batches} batches of 1,000 frames ({total / 1e6:.1f} MB as the store counts them)")
    print(f"reference: storing         {args.batches / store_s:8.0f} batches/s")
    print(f"measuring (collStats+dbStats) {measure_ms:6.1f} ms a round")
    print(f"trimming:                  {removed.batches / trim_s:8.0f} batches/s ({removed.batches} removed, "
          f"{left} left, {removed.frames} frames counted)")
    print(f"trim / store time per batch: {(trim_s / removed.batches) / (store_s / args.batches):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
