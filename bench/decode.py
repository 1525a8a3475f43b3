"""Sequential decode speed, decord vs PyAV, side by side in one run (frames/s on one core).

    python bench/decode.py [--size 1280x720] [--frames 121] [--repeats 3]

Encodes a test clip from a shipped photo with known motion (H.264, the codec of most corpora) and
reads the same contiguous range with both readers, single-threaded, plus Megamind.avi (MPEG-4 Part 2)
when opencv-doc is installed. Prints a markdown table and a JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import av  # noqa: E402
import decord  # noqa: E402

from preprocess import demo_media, video  # noqa: E402


def pyav_read(path: str, n: int, threads: bool) -> int:
    got = 0
    with av.open(path) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO" if threads else "SLICE"
        if not threads:
            s.codec_context.thread_count = 1
        for f in c.decode(s):
            f.to_ndarray(format="rgb24")
            got += 1
            if got == n:
                break
    return got


def decord_read(path: str, n: int, threads: bool) -> int:
    vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=0 if threads else 1)
    return len(vr.get_batch(list(range(min(n, len(vr))))).asnumpy())


def bench(path: str, n: int, repeats: int) -> dict:
    out = {}
    for name, fn in (("pyav", pyav_read), ("decord", decord_read)):
        for threads in (False, True):
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                got = fn(path, n, threads)
                best = min(best, time.perf_counter() - t0)
            out[f"{name}{'_threads' if threads else '_1thread'}"] = got / best
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--frames", type=int, default=121)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    w, h = map(int, a.size.split("x"))
    with tempfile.TemporaryDirectory() as d:
        frames, _ = demo_media.render_motion(demo_media.load_photo("astronaut"), (w, h), a.frames,
                                          demo_media.Motion(shift=(80, 20), rotate=(0, 10)))
        clip = os.path.join(d, "clip.mp4")
        with open(clip, "wb") as f:
            f.write(video.encode_mp4(frames, 25.0, crf=20, preset="medium"))
        results = {f"h264 {w}x{h}": bench(clip, a.frames, a.repeats)}
        if demo_media.MEGAMIND.exists():
            results["mpeg4 720x528 (Megamind.avi)"] = bench(str(demo_media.MEGAMIND), 270, a.repeats)
    cols = ["pyav_1thread", "decord_1thread", "pyav_threads", "decord_threads"]
    print("| clip | " + " | ".join(f"{c} (frames/s)" for c in cols) + " | PyAV/decord, 1 thread |")
    print("|---|" + "---|" * (len(cols) + 1))
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.0f}" for c in cols)
              + f" | {r['pyav_1thread'] / r['decord_1thread']:.2f}× |")
    print(json.dumps({"bench": "decode", "cpus": os.cpu_count(), "results": results}))


if __name__ == "__main__":
    main()
