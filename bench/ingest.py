"""Ingest benchmark: DCMTK storescu → (a) DCMTK storescp +B, (b) the triage listener.

Same files, same sender, same run: one association, then several in parallel. The triage
listener writes durably (fsync of each file and its folder, and a committed store row) before it
answers; storescp +B writes without fsync. A third reference, "durable writes alone", writes the
same files through the spool one by one (fsync of each file and folder, no network, no store):
the disk's own ceiling for a listener that makes each instance durable before answering.
Every DCMTK process runs with TCP_NODELAY=1 (Debian's DCMTK leaves Nagle on otherwise, which
costs it about 6×).

    python -m bench.ingest --files 100 --size-mb 10 --reps 3 --parallel 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.peers import dcmtk, free_port, write_config  # noqa: E402
from triage.testing.synth import write_benchmark_files  # noqa: E402

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
DISK_TARGET = "durable writes alone"


@dataclass
class Sample:
    """One timed transfer."""

    target: str
    mode: str
    seconds: float
    megabytes: float
    instances: int

    @property
    def mb_per_s(self) -> float:
        return self.megabytes / self.seconds

    @property
    def instances_per_s(self) -> float:
        return self.instances / self.seconds


def send(port: int, called: str, files: list[Path], parallel: int) -> float:
    """Run *parallel* storescu processes over the files; seconds until the last one is done."""
    chunks = [files[i::parallel] for i in range(parallel)]
    start = time.perf_counter()
    senders = [
        subprocess.Popen(
            [dcmtk("storescu"), "-aec", called, "127.0.0.1", str(port), *map(str, chunk)],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for chunk in chunks
    ]
    for sender in senders:
        _, err = sender.communicate()
        if sender.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-500:]}")
    return time.perf_counter() - start


def wait_port(port: int, timeout: float = 60.0) -> None:
    """Wait until something accepts connections on *port*."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def run_storescp(work: Path, files: list[Path], parallel: int) -> float:
    out = work / "storescp"
    out.mkdir(parents=True)
    port = free_port()
    args = [dcmtk("storescp"), "+B", "-od", str(out), "-aet", "STORESCP", str(port)]
    if parallel > 1:
        args.insert(1, "--fork")
    server = subprocess.Popen(
        args, env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_port(port)
        seconds = send(port, "STORESCP", files, parallel)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        subprocess.run(["pkill", "-f", f"storescp.*{port}"], check=False)
    received = sum(1 for _ in out.iterdir())
    if received != len(files):
        raise RuntimeError(f"storescp stored {received} of {len(files)}")
    return seconds


def run_durable_writes(work: Path, files: list[Path]) -> float:
    """The disk's own ceiling for durable ingest: each file written through the spool (temp
    file, fsync, rename, fsync of the folder), one after another, no network and no store.

    No listener that fsyncs each instance before answering can beat this on one association;
    storescp +B never waits for the disk, so on a slow disk this, not storescp, bounds us.
    """
    from pydicom import dcmread

    from triage.store.spool import Spool

    spool = Spool(work / "spool")
    spool.prepare()
    names = []
    for path in files:
        header = dcmread(path, stop_before_pixels=True)
        names.append(spool.relative_path(str(header.StudyInstanceUID), str(header.SOPInstanceUID)))
    start = time.perf_counter()
    for path, relative in zip(files, names, strict=True):
        spool.write(relative, [path.read_bytes()])
    return time.perf_counter() - start


def run_triage(work: Path, files: list[Path], parallel: int, processes: int) -> float:
    work.mkdir(parents=True)
    port = free_port()
    config = write_config(
        work / "triage.toml",
        {
            "dicom": {"bind": "127.0.0.1", "port": port, "listener_processes": processes},
            "store": {
                "url": f"sqlite:///{work / 'triage.db'}",
                "spool_dir": str(work / "spool"),
                "min_free_mb": 1,
            },
            "study": {"quiet_period_s": 3600.0},
            "worker": {"enabled": False},
            "log": {"level": "warning"},
        },
    )
    log = open(work / "daemon.log", "wb")  # noqa: SIM115
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    daemon = subprocess.Popen(
        [sys.executable, "-m", "triage", "--config", str(config), "serve"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=work,
    )
    try:
        wait_port(port)
        time.sleep(0.5 * processes)  # every listener process bound
        seconds = send(port, "TRIAGE", files, parallel)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        log.close()
    stored = sum(1 for p in (work / "spool").rglob("*.dcm"))
    if stored != len(files):
        raise RuntimeError(f"triage stored {stored} of {len(files)}: see {work / 'daemon.log'}")
    return seconds


def summarise(samples: list[Sample]) -> list[dict[str, object]]:
    """Median and min–max per (target, mode)."""
    rows = []
    keys = list(dict.fromkeys((s.target, s.mode) for s in samples))
    for target, mode in keys:
        group = [s for s in samples if (s.target, s.mode) == (target, mode)]
        rates = [s.mb_per_s for s in group]
        rows.append(
            {
                "target": target,
                "mode": mode,
                "reps": len(group),
                "mb_s_median": statistics.median(rates),
                "mb_s_min": min(rates),
                "mb_s_max": max(rates),
                "inst_s_median": statistics.median(s.instances_per_s for s in group),
            }
        )
    return rows


def print_table(rows: list[dict[str, object]]) -> None:
    """The results as a table: each row's ratio to storescp in the same mode, and to the
    disk's own durable-write rate (the ceiling for any listener that fsyncs each instance)."""
    reference = {r["mode"]: r["mb_s_median"] for r in rows if r["target"] == "storescp +B"}
    disk = next((r["mb_s_median"] for r in rows if r["target"] == DISK_TARGET), None)
    header = (
        f"{'target':<28} {'mode':<22} {'MB/s median':>11} {'min-max':>15} {'inst/s':>7} "
        f"{'vs storescp':>11} {'vs durable writes':>17}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        ratio = row["mb_s_median"] / reference[row["mode"]] if row["mode"] in reference else 0
        to_disk = (
            f"{row['mb_s_median'] / disk:>16.2f}x"
            if disk and str(row["target"]).startswith("triage")
            else f"{'':>17}"
        )
        print(
            f"{row['target']:<28} {row['mode']:<22} {row['mb_s_median']:>11.0f} "
            f"{row['mb_s_min']:>7.0f}-{row['mb_s_max']:<7.0f} {row['inst_s_median']:>7.1f} "
            f"{ratio:>10.2f}x {to_disk}"
        )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--size-mb", type=float, default=10.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=4, help="senders in the parallel case")
    parser.add_argument(
        "--processes",
        type=int,
        default=os.cpu_count() or 2,
        help="triage listener processes in the parallel case",
    )
    parser.add_argument("--workdir", default=None, help="where files go (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the samples and summary here")
    args = parser.parse_args(argv)

    base = Path(
        args.workdir
        or tempfile.mkdtemp(
            prefix="triage-bench-", dir=ROOT / "var" if (ROOT / "var").is_dir() else None
        )
    )
    base.mkdir(parents=True, exist_ok=True)
    files = write_benchmark_files(base / "files", args.files, size_mb=args.size_mb)
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    print(
        f"{len(files)} files, {megabytes:.0f} MB, {args.reps} repetitions, "
        f"{platform.node()} ({os.cpu_count()} CPUs), TCP_NODELAY=1"
    )
    plans = [
        ("storescp +B", "1 association", lambda w: run_storescp(w, files, 1)),
        (DISK_TARGET, "1 association", lambda w: run_durable_writes(w, files)),
        ("triage (1 process)", "1 association", lambda w: run_triage(w, files, 1, 1)),
        (
            "storescp +B --fork",
            f"{args.parallel} associations",
            lambda w: run_storescp(w, files, args.parallel),
        ),
        (
            "triage (1 process)",
            f"{args.parallel} associations",
            lambda w: run_triage(w, files, args.parallel, 1),
        ),
        (
            f"triage ({args.processes} processes)",
            f"{args.parallel} associations",
            lambda w: run_triage(w, files, args.parallel, args.processes),
        ),
    ]
    samples: list[Sample] = []
    for rep in range(args.reps):
        for n, (target, mode, run) in enumerate(plans):
            work = base / f"rep{rep}-{n}"
            seconds = run(work)
            samples.append(
                Sample(
                    target,
                    mode.replace("associations", "associations"),
                    seconds,
                    megabytes,
                    len(files),
                )
            )
            shutil.rmtree(work, ignore_errors=True)
            print(
                f"  rep {rep + 1} {target:<26} {mode:<16} {megabytes / seconds:7.0f} MB/s",
                flush=True,
            )
    # storescp's single-process and --fork rows are the references of their own mode.
    for sample in samples:
        if sample.target == "storescp +B --fork":
            sample.target = "storescp +B"
    rows = summarise(samples)
    print()
    print_table(rows)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"samples": [asdict(s) for s in samples], "summary": rows}, indent=2)
        )
    if not args.workdir:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
