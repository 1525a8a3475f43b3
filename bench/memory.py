"""Peak memory of every actor of the preprocessing pipeline on one long video (the memory bound of a clip).

    python bench/memory.py [--minutes 60] [--size 96] [--video PATH] [--writer-clips 4,16] [--out FILE.json]
                           [hydra overrides ...]

1. The pipeline: generates a long driving video (``demo_media.write_long_video``: ``--minutes`` at 25 fps and
   ``--size`` px, shots of 10 s with hard cuts; cached under ``~/.cache/dreamactor/bench``; or ``--video``), runs the
   real job on it (``python preprocess/run.py``, local Ray, ``annotators=none``, clips stored at ``--size`` unless
   overridden) and samples every process of the job's tree every ``--every`` seconds: the kernel's high-water mark
   of its resident memory (``VmHWM``: peak RSS, pages of the object store it wrote included), its private memory
   (``RssAnon``: heap, sampled peak) and its CPU seconds. Processes are grouped by role: ``writer``
   (``ray::ShardWriter``), the Ray Data actor or tasks of each stage by name, the isolated decoder, the driver, Ray's
   own processes.
2. With ``--writer-clips``: the shard writer with the shipped references stage (dlib identity), in this process, on
   one video of that many annotated 121-frame clips (``tests.preprocess.helpers.annotated_rows``: two real faces,
   every annotation field), arriving one clip per call as from Ray; tracemalloc's peak. The pipeline above runs no
   annotator (it would take hours on a CPU), so this is where the references stage's memory shows.

Prints markdown tables and writes the JSON (default ``outputs/bench/memory-<minutes>min.json``). Memory per actor is
bounded by a clip when the figures of a short and a long video agree.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

CACHE = Path.home() / ".cache" / "dreamactor" / "bench"
_KB = {"VmHWM": 0, "VmRSS": 0, "RssAnon": 0}
INTERNALS, WORKER = "Ray internals", "Ray worker (idle/tasks)"


def role(cmdline: list[str]) -> str:
    """What a process of the job is, from its command line (Ray titles a worker ``ray::<actor class>``)."""
    line = " ".join(cmdline)
    if cmdline and os.path.basename(cmdline[0]) in ("raylet", "gcs_server"):
        return INTERNALS
    if "preprocess.isolate" in line:
        return "isolated decoder (probe)"
    if line.startswith("ray::"):
        m = re.match(r"ray::(MapWorker\()?MapBatches\((\w+)\)", line)
        if m:
            return f"{m.group(2)} {'actor' if m.group(1) else 'tasks'}"
        return {"ray::ShardWriter": "writer", "ray::IDLE": WORKER}.get(line.split(".")[0].split()[0], INTERNALS)
    if "default_worker.py" in line:
        return WORKER
    if "preprocess/run.py" in line:
        return "driver"
    return INTERNALS  # dashboard, agents, monitors, the reaper


def status_kb(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS and RssAnon of a process, kB (empty once it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k = line.split(":", 1)[0]
                if k in _KB:
                    out[k] = int(line.split()[1])
    except OSError:
        return {}
    return out


def sample_tree(root: psutil.Process, seen: dict[int, dict]) -> None:
    """Update ``seen`` {pid: {role, hwm_kb, anon_kb, cpu_s}} with every live process under ``root``."""
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        st = status_kb(p.pid)
        if not st:
            continue
        rec = seen.setdefault(p.pid, {"role": WORKER, "hwm_kb": 0, "anon_kb": 0, "cpu_s": 0.0})
        try:
            r = role(p.cmdline())
            cpu = p.cpu_times()
        except psutil.Error:
            continue
        rec["cpu_s"] = max(rec["cpu_s"], cpu.user + cpu.system)
        if rec["role"] in (WORKER, INTERNALS):  # a Ray worker takes its actor's name once the actor starts
            rec["role"] = r
        rec["hwm_kb"] = max(rec["hwm_kb"], st.get("VmHWM", 0))
        rec["anon_kb"] = max(rec["anon_kb"], st.get("RssAnon", 0))


def run_job(video: Path, size: int, overrides: list[str], every: float) -> tuple[dict, float, int, dict]:
    """Run preprocess/run.py on ``video``; returns ({pid: peaks}, wall seconds, exit code, summary.json)."""
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as out:
        cmd = [sys.executable, str(ROOT / "preprocess" / "run.py"), f"input={video}", f"output={out}",
               "annotators=none", f"decode.max_side={size}", "ray.progress_bars=false", "progress_interval_s=60",
               *overrides]
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT)
        root, seen = psutil.Process(proc.pid), {}
        while proc.poll() is None:
            sample_tree(root, seen)
            time.sleep(every)
        wall = time.time() - t0
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
    return seen, wall, proc.returncode, summary


def writer_with_refs(clip_counts: list[int], n_frames: int) -> dict:
    """Peak bytes of a writer with the shipped references stage on one video of each number of annotated clips."""
    from omegaconf import OmegaConf

    from preprocess.config import StageSpec
    from preprocess.synthetic import writer_peak

    d = OmegaConf.load(ROOT / "conf" / "annotators" / "embedded.yaml")["video_stages"]["refs"]
    refs = StageSpec(target=d.target, enabled=True, params=OmegaConf.to_container(d.params, resolve=True))
    out = {}
    print(f"\n| writer + references, {n_frames}-frame clips | peak traced (MiB) |\n|---|---:|")
    for n in clip_counts:
        with tempfile.TemporaryDirectory(prefix="bench-memory-writer-") as tmp:
            out[str(n)] = round(writer_peak(tmp, refs, n, n_frames=n_frames) / 2**20, 1)
        print(f"| {n} clips | {out[str(n)]:.1f} |", flush=True)
    return {"frames": n_frames, "peak_traced_mb_by_clips": out}


def pipeline(args, overrides: list[str]) -> dict:
    """Part 1: the job on one long video, peak memory per process role."""
    video = args.video
    if video is None:
        from preprocess import demo_media

        video = CACHE / f"long_{args.minutes:g}min_{args.size}px.mp4"
        if not video.exists():
            t0 = time.time()
            demo_media.write_long_video(video, args.minutes * 60, size=args.size)
            print(f"generated {video} in {time.time() - t0:.0f} s", file=sys.stderr)
    seen, wall, code, summary = run_job(video, args.size, overrides, args.every)
    by_role: dict[str, dict] = {}
    for rec in seen.values():
        r = by_role.setdefault(rec["role"], {"processes": 0, "peak_rss_mb": 0.0, "peak_anon_mb": 0.0, "cpu_s": 0.0})
        r["processes"] += 1
        r["cpu_s"] = round(r["cpu_s"] + rec["cpu_s"], 1)
        r["peak_rss_mb"] = max(r["peak_rss_mb"], round(rec["hwm_kb"] / 1024, 1))
        r["peak_anon_mb"] = max(r["peak_anon_mb"], round(rec["anon_kb"] / 1024, 1))
    result = {"video": str(video), "video_bytes": video.stat().st_size,
              "source_seconds": round(summary.get("hours_in", 0) * 3600, 1), "clips": summary.get("clips_written"),
              "size": args.size, "overrides": overrides, "exit_code": code, "wall_s": round(wall, 1),
              "stream_s": summary.get("stream_seconds"), "stage_seconds": summary.get("stage_seconds"),
              "roles": dict(sorted(by_role.items()))}
    print(f"\n{result['source_seconds']:.0f} s of video, {result['clips']} clips, {wall:.0f} s wall, exit {code}\n")
    print("| process | peak RSS (MiB) | peak private (MiB) | CPU s |\n|---|---:|---:|---:|")
    for name, r in result["roles"].items():
        n = f" (x{r['processes']})" if r["processes"] > 1 else ""
        print(f"| {name}{n} | {r['peak_rss_mb']:.0f} | {r['peak_anon_mb']:.0f} | {r['cpu_s']:.0f} |")
    return result


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=60.0, help="0 (and no --video): the writer measurement only")
    ap.add_argument("--size", type=int, default=96, help="frame side of the generated video and of stored clips")
    ap.add_argument("--video", type=Path, default=None, help="an existing video instead of a generated one")
    ap.add_argument("--every", type=float, default=0.2, help="sampling interval, s")
    ap.add_argument("--writer-clips", default="", help="comma-separated clip counts for the writer measurement")
    ap.add_argument("--frames", type=int, default=121, help="frames of a clip in the writer measurement")
    ap.add_argument("--out", type=Path, default=None, help="the JSON (default outputs/bench/memory-<minutes>min.json)")
    args, overrides = ap.parse_known_args(argv)
    result = {"bench": "memory", "cores": os.cpu_count()}
    if args.minutes or args.video:
        result.update(pipeline(args, overrides))
    if args.writer_clips:
        result["writer_with_refs"] = writer_with_refs([int(n) for n in args.writer_clips.split(",")], args.frames)
    print(json.dumps(result))
    out = args.out or ROOT / "outputs" / "bench" / f"memory-{args.minutes:g}min.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {out}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
