"""A bounded on-disk spool: batches wait here while MongoDB is away or slow.

One file per batch, named ``<run>-<seq>.psb`` so that the name order is the
replay order (runs are named by their start time). A file is written to a
temporary name, fsync'd, renamed, and the directory fsync'd: after ``put``
returns, the batch survives a power cut. Each file carries an xxh64 checksum
of its contents; a file that fails it (or cannot be parsed) is moved to
``corrupt/`` and counted, never crashes the snooper.

Layout of a file: header ``<4sIQQ`` (magic ``PSB1``, metadata length, data
length, xxh64 of metadata + data), JSON metadata (sensor, run, seq, n), and
the frames packed with ``appliance.framebatch``.

When the spool would exceed ``spool_max_mb`` the policy applies:
``drop_newest`` refuses the new batch, ``drop_oldest`` deletes the oldest
files until it fits. Either way every frame dropped is counted in
``dropped_spool_full``. Only the process holding the spool's lock (the
snooper) replays; others (``import-pcap``) may only add.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import struct
import threading
from collections import OrderedDict
from pathlib import Path

import xxhash

from appliance import framebatch

from .batch import Batch

MAGIC = b"PSB1"
HEADER = struct.Struct("<4sIQQ")
SUFFIX = ".psb"


class Spool:
    def __init__(self, directory: str | os.PathLike, max_mb: int, policy: str, counters: dict,
                 log: logging.Logger | None = None, replay: bool = True):
        self.dir = Path(directory)
        self.max_bytes = max_mb * 1024 * 1024
        self.policy = policy
        self.counters = counters
        self.log = log or logging.getLogger("pisnoop.snooper.spool")
        self.lock = threading.Lock()
        self.index: OrderedDict[str, tuple[int, int]] = OrderedDict()  # name -> (bytes, frames)
        self.used = 0
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise OSError(f"spool directory {self.dir}: {exc.strerror}") from None
        self.owner = False
        if replay:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.owner = True
            except BlockingIOError:
                self.log.warning("spool %s is replayed by another process; this one only adds to it", self.dir)
        self._scan()

    # --- state ----------------------------------------------------------------

    @property
    def frames(self) -> int:
        with self.lock:
            return sum(n for _, n in self.index.values())

    def __len__(self) -> int:
        return len(self.index)

    def _scan(self) -> None:
        for tmp in self.dir.glob("*.tmp"):  # never renamed: the batch was not acknowledged
            tmp.unlink(missing_ok=True)
        inherited = 0
        for path in sorted(self.dir.glob("*" + SUFFIX)):
            try:
                with open(path, "rb") as fh:
                    magic, mlen, dlen, _ = HEADER.unpack(fh.read(HEADER.size))
                    meta = json.loads(fh.read(mlen))
                size = path.stat().st_size
                if magic != MAGIC or size != HEADER.size + mlen + dlen:
                    raise ValueError("bad header or length")
                n = int(meta["n"])
            except (OSError, ValueError, KeyError, struct.error, TypeError):
                self._move_corrupt(path, 0)
                continue
            self.index[path.name] = (size, n)
            self.used += size
            inherited += n
        if self.owner:
            self.counters["spool_inherited"] += inherited
        if self.index:
            self.log.info("spool %s holds %d batches (%d frames) from before", self.dir, len(self.index), inherited)

    # --- adding -----------------------------------------------------------------

    def put(self, batch: Batch) -> bool:
        """Write one batch durably; False (and counted) when the policy dropped it."""
        meta = json.dumps({"sensor": batch.sensor, "run": batch.run, "seq": batch.seq, "n": len(batch.frames)}).encode()
        data = framebatch.pack(batch.frames)
        digest = xxhash.xxh64(meta)
        digest.update(data)
        blob = HEADER.pack(MAGIC, len(meta), len(data), digest.intdigest()) + meta + data
        n = len(batch.frames)
        name = f"{batch.run}-{batch.seq:012d}{SUFFIX}"
        with self.lock:
            if name in self.index:  # the same batch id is the same batch: it is already safe here
                return True
            if self.used + len(blob) > self.max_bytes:
                if self.policy == "drop_oldest":
                    while self.index and self.used + len(blob) > self.max_bytes:
                        old, (size, old_n) = self.index.popitem(last=False)
                        (self.dir / old).unlink(missing_ok=True)
                        self.used -= size
                        self.counters["dropped_spool_full"] += old_n
                if self.used + len(blob) > self.max_bytes:
                    self.counters["dropped_spool_full"] += n
                    return False
            tmp = self.dir / (name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, blob)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.dir / name)
            self._fsync_dir()
            self.index[name] = (len(blob), n)
            self.used += len(blob)
            self.counters["spooled"] += n
            self.counters["spooled_batches"] += 1
        return True

    def _fsync_dir(self) -> None:
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # --- replaying ----------------------------------------------------------------

    def oldest(self) -> str | None:
        with self.lock:
            return next(iter(self.index), None)

    def load(self, name: str) -> Batch | None:
        """The batch in spool file ``name``; None if it vanished or was corrupt (then moved aside and counted)."""
        path = self.dir / name
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            self._forget(name)
            return None
        try:
            magic, mlen, dlen, digest = HEADER.unpack_from(blob, 0)
            body = memoryview(blob)[HEADER.size:]
            if magic != MAGIC or len(body) != mlen + dlen or xxhash.xxh64_intdigest(body) != digest:
                raise ValueError("checksum or length mismatch")
            meta = json.loads(bytes(body[:mlen]))
            frames = [tuple(f) for f in framebatch.unpack(bytes(body[mlen:]))]
            if len(frames) != meta["n"]:
                raise ValueError("frame count mismatch")
            return Batch(meta["sensor"], meta["run"], int(meta["seq"]), frames)
        except (ValueError, KeyError, TypeError, struct.error, framebatch.CorruptBatch) as exc:
            with self.lock:
                n = self.index.get(name, (0, 0))[1]
            self.log.error("spool file %s is corrupt (%s): moved to %s/corrupt, %d frames lost", name, exc, self.dir, n)
            self._move_corrupt(path, n)
            return None

    def remove(self, name: str) -> None:
        """Forget a batch that reached the store."""
        (self.dir / name).unlink(missing_ok=True)
        self._forget(name)

    def _forget(self, name: str) -> int:
        with self.lock:
            size, n = self.index.pop(name, (0, 0))
            self.used -= size
            return n

    def _move_corrupt(self, path: Path, frames: int) -> None:
        self._forget(path.name)
        aside = self.dir / "corrupt"
        aside.mkdir(exist_ok=True)
        try:
            os.replace(path, aside / path.name)
        except OSError:
            path.unlink(missing_ok=True)
        self.counters["spool_corrupt"] += 1
        self.counters["dropped_corrupt"] += frames

    def close(self) -> None:
        os.close(self._lock_fd)
