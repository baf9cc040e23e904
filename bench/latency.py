"""Latency benchmark: Orthanc as the PACS, from the last instance leaving Orthanc to the SR
stored back in Orthanc.

For each study (1–4 views, cycling through the seven MURA types), uploaded to Orthanc beforehand
and not timed:

- t0: ``POST /modalities/triage/store`` with ``Synchronous: true`` returns, i.e. Orthanc's
  C-STORE of the study's last instance to triage is complete;
- t1: the SR is in Orthanc — ``/changes`` is polled every ``--poll-ms`` (20 ms by default, which
  is the resolution of t1), and each new instance of the study is looked at;
- t_all: every output (SR and one overlay per view) is in Orthanc.

Studies go one at a time (the next starts once the previous is DONE), so the figures are the
latency of an idle daemon, not of a queue. The daemon runs with its defaults (quiet period
10 s, scheduler check every 1 s, worker poll 0.5 s, batch wait 20 ms) except the demo model
being allowed; ``--quiet-period`` changes the quiet period only. Where the time goes is taken
from triage's own records: when its listener stored the last instance, and when the study became
QUEUED, SCORING (claimed) and DELIVERING (scored, outputs built), when the SR was acknowledged.
The target is p95(t1 − t0) ≤ quiet period + 2 s. Orthanc runs with TCP_NODELAY=1 (FACTS.md).

    python -m bench.latency --studies 20 --quiet-period 10
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.orthanc import Orthanc  # noqa: E402
from tests.peers import Daemon, free_port  # noqa: E402
from triage.store.models import StudyState  # noqa: E402
from triage.store.outbox import Outbox  # noqa: E402
from triage.study_types import StudyType  # noqa: E402
from triage.testing.synth import make_study, write_study  # noqa: E402

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


@dataclass
class Sample:
    """One study's timings; wall-clock seconds since the epoch unless said otherwise."""

    study_type: str
    views: int
    megabytes: float
    #: t0: the synchronous store to triage returned.
    stored: float
    #: t1: the SR was seen in Orthanc; t_all: every output was.
    sr_seen: float
    all_seen: float
    #: From triage's store: last instance recorded, state changes, SR acknowledged.
    last_received: float
    queued: float
    claimed: float
    scored: float
    sr_delivered: float
    warmup: bool = False

    @property
    def latency(self) -> float:
        """t1 − t0: the benchmark's figure."""
        return self.sr_seen - self.stored

    @property
    def latency_all(self) -> float:
        return self.all_seen - self.stored

    def stages(self) -> dict[str, float]:
        """Consecutive stages from t0 to t1 (they add up to the latency)."""
        return {
            "t0 → queued (quiet period + scheduler tick)": self.queued - self.stored,
            "queued → claimed (worker wake-up)": self.claimed - self.queued,
            "claimed → scored (decode, forward, outputs)": self.scored - self.claimed,
            "scored → SR acknowledged (sender)": self.sr_delivered - self.scored,
            "SR acknowledged → seen (Orthanc + poll)": self.sr_seen - self.sr_delivered,
        }


@dataclass
class Prepared:
    """A study uploaded to Orthanc, ready to be sent."""

    study_type: StudyType
    views: int
    megabytes: float
    study_uid: str
    study_id: str
    instance_ids: list[str] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method), *q* in 0..100."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def epoch(moment: datetime | None) -> float:
    """A naive-UTC timestamp from the store as seconds since the epoch."""
    if moment is None:
        return math.nan
    return moment.replace(tzinfo=UTC).timestamp()


def prepare(
    orthanc: Orthanc, folder: Path, count: int, size_mb: float, seed: int
) -> list[Prepared]:
    """Upload *count* studies (views 1, 2, 3, 4, 1 …; the seven types in turn)."""
    types = list(StudyType)
    prepared = []
    for index in range(count):
        study_type, views = types[index % len(types)], 1 + index % 4
        datasets = make_study(study_type, views=views, size_mb=size_mb, seed=seed + index)
        files = write_study(datasets, folder / f"study{index:03d}")
        answers = orthanc.upload(files)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        prepared.append(
            Prepared(
                study_type,
                views,
                megabytes,
                str(datasets[0].StudyInstanceUID),
                answers[0]["ParentStudy"],
                [a["ID"] for a in answers],
            )
        )
        for path in files:  # Orthanc holds them now
            path.unlink()
    return prepared


def watch_outputs(
    orthanc: Orthanc, study: Prepared, since: int, poll_s: float, timeout: float
) -> tuple[float, float, int]:
    """Poll ``/changes`` until the study's SR and all its overlays are in Orthanc.

    Returns (SR seen, all seen, last change sequence), times as ``time.time()``.
    """
    expected = 1 + study.views
    seen: set[str] = set()
    sr_seen = math.nan
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        page = orthanc.changes(since, limit=200)
        now = time.time()
        for change in page["Changes"]:
            if change["ChangeType"] != "NewInstance":
                continue
            parent = orthanc.get(f"/instances/{change['ID']}/study")
            if parent["ID"] != study.study_id or change["ID"] in study.instance_ids:
                continue
            seen.add(change["ID"])
            sop_class = orthanc.get(f"/instances/{change['ID']}/metadata/SopClassUid")
            if sop_class == SR_CLASS and math.isnan(sr_seen):
                sr_seen = now
        since = int(page["Last"])
        if len(seen) >= expected and not math.isnan(sr_seen):
            return sr_seen, now, since
        if page["Done"]:
            time.sleep(poll_s)
    raise TimeoutError(f"outputs of {study.study_uid} not in Orthanc after {timeout} s")


def measure(
    orthanc: Orthanc, daemon: Daemon, study: Prepared, poll_s: float, warmup: bool
) -> Sample:
    """Send one study to triage and time its way back."""
    since = int(orthanc.get("/changes?last")["Last"])
    answer = orthanc.store_to_modality([study.study_id])
    stored = time.time()
    if answer.get("FailedInstancesCount") or answer.get("InstancesCount") != study.views:
        raise RuntimeError(f"store to triage failed: {answer}")
    sr_seen, all_seen, _ = watch_outputs(orthanc, study, since, poll_s, 300)
    store = daemon.store()
    deadline = time.monotonic() + 60
    while store.get_study(study.study_uid).state is not StudyState.DONE:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{study.study_uid} not DONE: {daemon.log_text()[-2000:]}")
        time.sleep(0.05)
    events = {e.to_state: e.at for e in store.study_history(study.study_uid)}
    received = max(i.received_at for i in store.study_instances(study.study_uid))
    [sr_delivery] = [
        d for d, o in Outbox(store).deliveries(study.study_uid) if o.sop_class_uid == SR_CLASS
    ]
    return Sample(
        study_type=study.study_type.value,
        views=study.views,
        megabytes=round(study.megabytes, 1),
        stored=stored,
        sr_seen=sr_seen,
        all_seen=all_seen,
        last_received=epoch(received),
        queued=epoch(events.get(StudyState.QUEUED)),
        claimed=epoch(events.get(StudyState.SCORING)),
        scored=epoch(events.get(StudyState.DELIVERING)),
        sr_delivered=epoch(sr_delivery.delivered_at),
        warmup=warmup,
    )


def profile_steps(
    config_path: Path, workdir: Path, view_counts: tuple[int, ...], size_mb: float, seed: int
) -> dict[int, dict[str, float]]:
    """Median seconds of each step the worker runs between "claimed" and "scored", timed one
    by one in this process after the daemon stopped; per number of views.

    The steps are the worker's own functions: decode (read the file, Modality/VOI LUT, the
    halving shrink, model input and display image at the overlay's size; one torch thread, as
    in a decode process), the forward pass (batch of 1, as views come out of one decode
    process, and the whole study as one batch), and building and durably writing the SR and
    the overlays.
    """
    import statistics

    import torch
    from pydicom import dcmread

    from triage.config import load_config
    from triage.dicom.sc import OverlayBox
    from triage.scoring.outputs import OutputRequest, ViewPixels, build_outputs
    from triage.scoring.preprocess import decode_view
    from triage.scoring.result import StudyResult, ViewResult
    from triage.scoring.worker import load_configured_model
    from triage.store.spool import Spool

    config = load_config(config_path, env={}, base_dir=config_path.parent)
    model = load_configured_model(config)
    spool = Spool(workdir / "profile-spool")
    spool.prepare()
    threads = torch.get_num_threads()
    # As the worker asks for display images: at the overlay's size, none without overlays.
    overlays = config.outputs.overlays
    overlay_box = OverlayBox(model.info, config.outputs.max_side) if overlays else None
    profile: dict[int, dict[str, float]] = {}
    for views in view_counts:
        datasets = make_study(StudyType.WRIST, views=views, size_mb=size_mb, seed=seed + views)
        files = write_study(datasets, workdir / f"profile-{views}")
        timings: dict[str, list[float]] = {}

        def timed(step: str, work: Any, timings: dict[str, list[float]] = timings) -> Any:
            started = time.perf_counter()
            value = work()
            timings.setdefault(step, []).append(time.perf_counter() - started)
            return value

        for rep in range(4):  # round 0 warms caches and is not counted: median of 3
            torch.set_num_threads(1)
            decoded = [
                timed(
                    "decode, per view (1 torch thread)",
                    lambda f=f: decode_view(
                        str(f), model.input_size, model.mean, model.std, 0, overlay_box
                    ),
                )
                for f in files
            ]
            torch.set_num_threads(threads)
            for view in decoded:
                timed(
                    f"forward, batch of 1, per view ({threads} threads)",
                    lambda v=view: model.forward(model.make_batch([v.array])),
                )
            logits, cams = timed(
                "forward, the study as one batch",
                lambda d=decoded: model.forward(model.make_batch([v.array for v in d])),
            )
            probabilities = torch.sigmoid(logits).tolist()
            result = StudyResult(
                study_uid=str(datasets[0].StudyInstanceUID),
                revision=rep + 1,  # new output UIDs each round
                study_type=StudyType.WRIST,
                probability=float(sum(probabilities) / len(probabilities)),
                threshold=model.card.threshold_for(StudyType.WRIST),
                views=tuple(
                    ViewResult(
                        v.sop_instance_uid, float(p), cams.numpy()[i], v.note, float(logits[i])
                    )
                    for i, (v, p) in enumerate(zip(decoded, probabilities, strict=True))
                ),
            )
            pixels = {
                v.sop_instance_uid: ViewPixels(
                    dcmread(f, stop_before_pixels=True), v.display, (v.rows, v.columns)
                )
                for v, f in zip(decoded, files, strict=True)
            }
            timed(
                "SR + overlays built and written",
                lambda r=result, px=pixels: build_outputs(
                    OutputRequest(config, spool, r, model.info, px)
                ),
            )
            if rep == 0:
                timings.clear()
        profile[views] = {step: statistics.median(values) for step, values in timings.items()}
    return profile


def summarise(samples: list[Sample], quiet_period_s: float) -> tuple[str, bool]:
    """The tables, and whether the target was met."""
    lines = []
    header = f"{'views':>5} {'n':>3} {'p50 SR':>8} {'p95 SR':>8} {'max SR':>8} {'p50 all':>8}"
    header += f" {'p95 all':>8}"
    lines += ["latency t0 → SR in Orthanc (s); 'all' = SR and every overlay", header]
    groups: list[tuple[str, list[Sample]]] = [
        (str(v), [s for s in samples if s.views == v]) for v in sorted({s.views for s in samples})
    ]
    groups.append(("all", samples))
    for label, group in groups:
        sr = [s.latency for s in group]
        every = [s.latency_all for s in group]
        lines.append(
            f"{label:>5} {len(group):>3} {percentile(sr, 50):8.2f} {percentile(sr, 95):8.2f} "
            f"{max(sr):8.2f} {percentile(every, 50):8.2f} {percentile(every, 95):8.2f}"
        )
    lines += ["", f"{'stage':<46} {'p50':>7} {'p95':>7} {'max':>7}"]
    for stage in samples[0].stages():
        values = [s.stages()[stage] for s in samples]
        lines.append(
            f"{stage:<46} {percentile(values, 50):7.3f} {percentile(values, 95):7.3f} "
            f"{max(values):7.3f}"
        )
    lag = [s.stored - s.last_received for s in samples]
    lines.append(
        f"{'(last instance recorded → t0, before t0)':<46} {percentile(lag, 50):7.3f} "
        f"{percentile(lag, 95):7.3f} {max(lag):7.3f}"
    )
    p95 = percentile([s.latency for s in samples], 95)
    target = quiet_period_s + 2.0
    met = p95 <= target
    lines += [
        "",
        f"quiet period {quiet_period_s:g} s; target p95 ≤ quiet period + 2 s = {target:g} s: "
        f"p95 = {p95:.2f} s → {'MET' if met else 'MISSED'}",
    ]
    return "\n".join(lines), met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=20, help="timed studies (default 20)")
    parser.add_argument("--quiet-period", type=float, default=10.0, help="seconds (default 10)")
    parser.add_argument("--size-mb", type=float, default=10.0, help="MiB per view (default 10)")
    parser.add_argument("--poll-ms", type=float, default=20.0, help="Orthanc polling interval")
    parser.add_argument(
        "--check-interval",
        type=float,
        help="[study] check_interval_s, how often the scheduler looks for quiet studies "
        "(default: the daemon's, 1 s)",
    )
    parser.add_argument(
        "--model-threads",
        type=int,
        help="[model] threads, torch's CPU threads for the forward pass (default: the daemon's, "
        "torch's own choice)",
    )
    parser.add_argument("--seed", type=int, default=7000)
    parser.add_argument("--json", type=Path, help="write every sample to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="afterwards, time the worker's steps one by one for a 1- and a 4-view study",
    )
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="triage-latency-"))
    port = free_port()
    orthanc = Orthanc(workdir / "orthanc", ("TRIAGE", port), routing=False)
    sections: dict[str, Any] = {
        "dicom": {"port": port, "allowed_peers": ["ORTHANC"]},
        "study": {"quiet_period_s": args.quiet_period},
        "worker": {"enabled": True},
        "model": {"allow_unvalidated": True},
        "log": {"level": "info"},
        "destinations": [orthanc.destination()],
    }
    if args.check_interval is not None:
        sections["study"]["check_interval_s"] = args.check_interval
    if args.model_threads is not None:
        sections["model"]["threads"] = args.model_threads
    daemon = Daemon(workdir / "triage", sections)
    samples: list[Sample] = []
    version, load_at_start = "?", math.nan
    steps: dict[int, dict[str, float]] = {}
    try:
        orthanc.start()
        version = orthanc_version(orthanc)
        load_at_start = os.getloadavg()[0]
        started = time.monotonic()
        daemon.start()
        print(f"daemon ready in {time.monotonic() - started:.1f} s", flush=True)
        started = time.monotonic()
        studies = prepare(orthanc, workdir / "in", args.studies + 1, args.size_mb, args.seed)
        print(f"{len(studies)} studies uploaded to Orthanc in {time.monotonic() - started:.1f} s")
        print(f"{'#':>3} {'type':<11} {'views':>5} {'MB':>6} {'t0→SR':>7} {'t0→all':>7}")
        for index, study in enumerate(studies):
            sample = measure(orthanc, daemon, study, args.poll_ms / 1000, warmup=index == 0)
            samples.append(sample)
            label = "warm-up" if sample.warmup else f"{index:>3}"
            print(
                f"{label:>3} {sample.study_type:<11} {sample.views:>5} {sample.megabytes:6.1f} "
                f"{sample.latency:7.2f} {sample.latency_all:7.2f}",
                flush=True,
            )
        daemon.stop()
        orthanc.stop()
        if args.profile:
            steps = profile_steps(daemon.config_path, workdir, (1, 4), args.size_mb, args.seed)
    finally:
        daemon.stop()
        orthanc.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"work folder kept: {workdir}")
    timed = [s for s in samples if not s.warmup]
    table, met = summarise(timed, args.quiet_period)
    print()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {load_at_start:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
        f"Orthanc {version} with "
        f"TCP_NODELAY=1; {args.size_mb:g} MiB per view; poll every {args.poll_ms:g} ms"
    )
    changed = {k: v for k, v in sections.items() if k in {"study", "model"}}
    print(f"daemon settings beyond its defaults: {json.dumps(changed)}")
    print(table)
    if args.profile:
        print("\nworker steps timed one by one in this process, daemon stopped (median of 3, s):")
        for views, timing in steps.items():
            for step, seconds in timing.items():
                print(f"  {views} view(s): {step:<42} {seconds:7.3f}")
    if args.json:
        args.json.write_text(json.dumps([asdict(s) for s in samples], indent=1) + "\n")
    return 0 if met else 1


def orthanc_version(orthanc: Orthanc) -> str:
    """The server's version, as its REST API reports it."""
    return str(orthanc.get("/system")["Version"])


if __name__ == "__main__":
    sys.exit(main())
