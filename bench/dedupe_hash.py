#!/usr/bin/env python3
"""Which hash for the dedupe window: cost per frame at 64 and 512 bytes, as a ratio to xxh3_64.

The snooper hashes every captured frame, so this is on the hot path. Prints ns per frame and the
ratio of each candidate to xxh3_64 (the one the snooper uses), measured in this one run.
"""

from __future__ import annotations

import hashlib
import os
import time

import xxhash

CANDIDATES = {
    "xxh3_64": xxhash.xxh3_64_intdigest,
    "xxh64": xxhash.xxh64_intdigest,
    "xxh3_128": xxhash.xxh3_128_intdigest,
    "builtin hash": hash,
    "blake2b-8": lambda d: hashlib.blake2b(d, digest_size=8).digest(),
    "md5": lambda d: hashlib.md5(d).digest(),
    "sha1": lambda d: hashlib.sha1(d).digest(),
    "sha256": lambda d: hashlib.sha256(d).digest(),
}


def per_frame_ns(fn, frames: list[bytes], rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        frames = [bytes(bytearray(f)) for f in frames]  # fresh objects: bytes caches its builtin hash()
        t = time.perf_counter_ns()
        for f in frames:
            fn(f)
        best = min(best, (time.perf_counter_ns() - t) / len(frames))
    return best


def main() -> None:
    for size in (64, 512):
        frames = [os.urandom(size) for _ in range(100_000)]
        base = per_frame_ns(CANDIDATES["xxh3_64"], frames)
        print(f"{size} B frames (best of 5 x 100k):")
        for name, fn in CANDIDATES.items():
            ns = per_frame_ns(fn, frames)
            print(f"  {name:<13} {ns:7.0f} ns/frame  {ns / base:5.1f}x xxh3_64")


if __name__ == "__main__":
    main()
