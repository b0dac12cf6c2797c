"""Prediction latency while new model versions land (hot swaps under load).

    python -m loadtest.swap_under_load --url http://127.0.0.1:3000 --token T \\
        [--users 8] [--spawn-rate 4] [--updates 5] [--window-s 1] [--out results]

Locust prediction users (single and batched, ``loadtest/locustfile.py``) run while the
updater posts ``--updates`` new classes one after another (each: /learn -> job -> new
version -> every API worker swaps); the run ends ``--tail`` s after the last version landed
(or at ``--max-duration``). Every prediction's start time, latency and answering version is
recorded.

Swap windows. For a landed version v, ``commit`` is the job's ``finished`` time (the learner
moved the serving pointer then); ``last_stale`` is the latest start of a prediction that
began after the commit but was still answered by an older version (a worker that had not
swapped yet; ``commit`` if there is none). The swap window is
``[commit, max(commit, last_stale) + W]`` with ``W = --window-s``: from the moment the new
version exists until W after the last worker was seen answering with the old one (each
worker loads the version, then switches; W covers the load's after-effects). A prediction
is ``during_swaps`` when its [start, end] overlaps a window; otherwise ``training`` when it
overlaps a learner job's [started, finished] (on a CPU machine training shares the cores
with the API workers), else ``quiet``; ``outside_swaps`` = training + quiet.

Writes ``<out>/swap_under_load_<time>.json`` (the Locust summary of ``loadtest.run`` plus
the per-category percentiles and the swaps), ``.png`` (latency over time, swap windows and
commits marked, training shaded) and Locust's CSVs under ``<out>/swap_under_load_<time>/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from .client import Client
from .run import (
    PREDICT,
    add_common,
    format_summary,
    locust_options,
    percentiles,
    read_records,
    run_locust,
)


def _ts(value: Any) -> float | None:
    return None if value in (None, "") else datetime.fromisoformat(str(value)).timestamp()


@dataclass(frozen=True)
class Predictions:
    """The recorded predictions as arrays: start, latency, success, answering version."""

    t: np.ndarray
    ms: np.ndarray
    ok: np.ndarray
    ver: np.ndarray  # -1: no version (a failed request)

    @property
    def end(self) -> np.ndarray:
        return self.t + self.ms / 1000.0

    @classmethod
    def of(cls, predicts: list[dict[str, Any]]) -> Predictions:
        return cls(
            t=np.array([r["t"] for r in predicts]),
            ms=np.array([r["ms"] for r in predicts]),
            ok=np.array([r["ok"] for r in predicts]),
            ver=np.array([-1 if r["version"] is None else r["version"] for r in predicts]),
        )


def swap_window(job: dict[str, Any], p: Predictions, window_s: float) -> dict[str, Any] | None:
    """The swap of a landed job's version (module docstring); None when neither the job
    nor any answer says when it was committed."""
    v = int(job["version"])
    started, finished = _ts(job.get("started")), _ts(job.get("finished"))
    end = p.end
    answered_new = p.ok & (p.ver >= v)
    first_seen = float(end[answered_new].min()) if answered_new.any() else None
    commit = finished if finished is not None else first_seen
    if commit is None:
        return None
    stale = p.ok & (p.ver >= 0) & (p.ver < v) & (p.t >= commit)
    last_stale = float(p.t[stale].max()) if stale.any() else commit
    return {
        "version": v,
        "class": job.get("class"),
        "commit": commit,
        "first_answer": first_seen,
        "first_answer_after_commit_s": None if first_seen is None else first_seen - commit,
        "last_stale_start_after_commit_s": last_stale - commit,
        "stale_answers_after_commit": int(stale.sum()),
        "window": [commit, max(commit, last_stale) + window_s],
        "train_seconds": None if started is None or finished is None else finished - started,
    }


def swaps_and_training(
    jobs: list[dict[str, Any]], p: Predictions, window_s: float
) -> tuple[list[dict[str, Any]], list[tuple[float, float]]]:
    """The swap of every landed version (in version order) and the learner's training
    intervals ([started, finished] of each landed job)."""
    swaps: list[dict[str, Any]] = []
    training: list[tuple[float, float]] = []
    landed = sorted(
        (j for j in jobs if j.get("state") == "done"), key=lambda j: j.get("version") or 0
    )
    for j in landed:
        started, finished = _ts(j.get("started")), _ts(j.get("finished"))
        if started is not None and finished is not None:
            training.append((started, finished))
        swap = swap_window(j, p, window_s)
        if swap is not None:
            swaps.append(swap)
    return swaps, training


def _overlaps(a0: np.ndarray, a1: np.ndarray, spans: list[tuple[float, float]]) -> np.ndarray:
    m = np.zeros(a0.shape, dtype=bool)
    for a, b in spans:
        m |= (a0 <= b) & (a1 >= a)
    return m


def latency_by_category(
    p: Predictions,
    windows: list[tuple[float, float]],
    training: list[tuple[float, float]],
) -> dict[str, dict[str, Any]]:
    """Requests, failures, seconds, rate and latency percentiles of the predictions during
    swaps, outside them, and (outside) while the learner trained or not."""
    end = p.end
    t0, t1 = float(p.t.min()), float(end.max())
    in_swap = _overlaps(p.t, end, windows)
    in_train = _overlaps(p.t, end, training) & ~in_swap
    # The seconds of each category, on a 10 ms grid.
    grid = np.arange(t0, t1, 0.01)
    g_swap = _overlaps(grid, grid, windows)
    g_train = _overlaps(grid, grid, training) & ~g_swap
    categories = {
        "during_swaps": (in_swap, float(g_swap.sum()) * 0.01),
        "outside_swaps": (~in_swap, float((~g_swap).sum()) * 0.01),
        "training": (in_train, float(g_train.sum()) * 0.01),
        "quiet": (~in_swap & ~in_train, float((~g_swap & ~g_train).sum()) * 0.01),
    }
    stats = {}
    for name, (mask, seconds) in categories.items():
        stats[name] = {
            "requests": int(mask.sum()),
            "failures": int((mask & ~p.ok).sum()),
            "seconds": seconds,
            "rps": float(mask.sum() / seconds) if seconds > 0 else None,
            **percentiles(p.ms[mask & p.ok]),
        }
    return stats


def analyse(records: Path, window_s: float) -> dict[str, Any]:
    reqs, jobs = read_records(records)
    predicts = [r for r in reqs if r["name"].startswith(PREDICT)]
    if not predicts:
        raise ValueError(f"no predictions recorded in {records}")
    p = Predictions.of(predicts)
    t0 = float(p.t.min())
    swaps, training = swaps_and_training(jobs, p, window_s)
    windows = [tuple(s["window"]) for s in swaps]
    return {
        "window_s": window_s,
        "t0": t0,
        "swaps": swaps,
        "training_intervals": training,
        "latency": latency_by_category(p, windows, training),
        "series": {"t": (p.t - t0).tolist(), "ms": p.ms.tolist(), "version": p.ver.tolist()},
        "ok": p.ok.tolist(),
    }


def swap_metrics(url: str, token: str | None) -> dict[str, float]:
    """The server's swap counters (summed over its API workers) from /metrics."""
    names = (
        "bsce_swaps_total",
        "bsce_swap_failures_total",
        "bsce_swap_duration_seconds_sum",
        "bsce_swap_duration_seconds_count",
    )
    out: dict[str, float] = {}
    try:
        with Client(url, token) as client:
            text = client.request("GET", "/metrics", timeout=30).text
    except Exception:  # the counters are extra information; the run does not need them
        return out
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        base = name.split("{", 1)[0]
        if base in names:
            with contextlib.suppress(ValueError, IndexError):
                out[base] = out.get(base, 0.0) + float(value.split()[0])
    return out


def _mark_training_and_swaps(ax: Any, analysis: dict[str, Any]) -> None:
    """Training intervals shaded grey, swap windows orange, commits as red dashed lines."""
    t0 = analysis["t0"]
    for i, (a, b) in enumerate(analysis["training_intervals"]):
        ax.axvspan(
            a - t0, b - t0, color="0.88", zorder=0, label="learner training" if i == 0 else None
        )
    for i, sw in enumerate(analysis["swaps"]):
        a, b = sw["window"]
        ax.axvspan(
            a - t0,
            b - t0,
            color="tab:orange",
            alpha=0.25,
            zorder=1,
            label="swap window" if i == 0 else None,
        )
        ax.axvline(
            sw["commit"] - t0,
            color="tab:red",
            ls="--",
            lw=0.9,
            zorder=2,
            label="new version committed" if i == 0 else None,
        )


def _scatter_latencies(ax: Any, analysis: dict[str, Any], cmap: Any) -> None:
    """One colour per answering version; failed requests as red crosses."""
    s = analysis["series"]
    t, ms, ver = np.array(s["t"]), np.array(s["ms"]), np.array(s["version"])
    ok = np.array(analysis["ok"])
    versions = sorted(set(ver[ver >= 0].tolist()))
    for k, v in enumerate(versions):
        m = (ver == v) & ok
        ax.scatter(
            t[m], ms[m], s=4, color=cmap(k / max(1, len(versions) - 1)), zorder=3, label=f"v{v}"
        )
    if (~ok).any():
        ax.scatter(t[~ok], ms[~ok], s=16, marker="x", color="red", zorder=4, label="failed")


def _title(analysis: dict[str, Any], summary: dict[str, Any]) -> str:
    lat = analysis["latency"]

    def p(name: str, q: str) -> str:
        v = lat[name][q]
        return "-" if v is None else f"{v:.0f}"

    return (
        f"{summary['users']} users, {summary['workers'] or '?'} API workers, "
        f"{len(analysis['swaps'])} swaps; p95 {p('during_swaps', 'p95_ms')} ms during swaps, "
        f"{p('outside_swaps', 'p95_ms')} ms outside; {summary['failures']} failed"
    )


def plot(analysis: dict[str, Any], summary: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.8), dpi=120)
    _mark_training_and_swaps(ax, analysis)
    _scatter_latencies(ax, analysis, plt.get_cmap("viridis"))
    ax.set_yscale("log")
    ax.set_xlabel("seconds since the first prediction")
    ax.set_ylabel("prediction latency (ms)")
    ax.set_title(_title(analysis, summary), fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=4, loc="upper left", markerscale=2)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.swap_under_load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common(p)
    p.add_argument("--updates", type=int, default=5, help="versions to land (at least 5 asked)")
    p.add_argument("--window-s", type=float, default=1.0, help="W after each swap (s)")
    p.add_argument("--tail", type=float, default=10.0, help="s of traffic after the last landing")
    p.add_argument("--max-duration", type=float, default=600.0, help="upper bound of the run (s)")
    p.add_argument(
        "--bad-update",
        type=int,
        default=-1,
        help="post update N (0-based) with lr 10: the promotion gate must reject it and no "
        "prediction may come from its version (-1: none)",
    )
    p.add_argument(
        "--update-classes",
        default="",
        help="comma-separated subset classes the updates post in turn (default: all)",
    )
    p.add_argument("--out", type=Path, default=Path("results"))
    p.set_defaults(first_update_after=10.0)
    return p


def swap_counter_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """The server's swap counters over the run, and the mean load time of a swap."""
    deltas: dict[str, Any] = {
        k: None if before.get(k) is None or after.get(k) is None else after[k] - before[k]
        for k in after
    }
    if deltas.get("bsce_swap_duration_seconds_count"):
        deltas["mean_load_seconds"] = (
            deltas["bsce_swap_duration_seconds_sum"] / deltas["bsce_swap_duration_seconds_count"]
        )
    return deltas


def print_latency(latency: dict[str, dict[str, Any]]) -> None:
    for name, st in latency.items():
        print(
            f"  {name:>13}: {st['requests']:>6} predictions, {st['failures']} failed, "
            + ", ".join(
                f"{q} {'-' if st[q + '_ms'] is None else format(st[q + '_ms'], '.0f')} ms"
                for q in ("p50", "p95", "p99")
            )
            + f", {st['seconds']:.0f} s"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = build_parser()
    args = p.parse_args(argv)
    if args.updates < 1:
        p.error("--updates must be at least 1")
    base = args.out / f"swap_under_load_{time.strftime('%Y%m%d-%H%M%S')}"
    with Client(args.url, args.token) as client:
        client.wait_ready(180)
    before = swap_metrics(args.url, args.token)
    summary = run_locust(
        args.url,
        args.users,
        args.spawn_rate,
        args.max_duration,
        base,
        stop_after_updates_s=args.tail,
        extra_args=[
            "--bsce-bad-update",
            str(args.bad_update),
            "--bsce-update-classes",
            args.update_classes,
        ],
        **locust_options(args),
    )
    after = swap_metrics(args.url, args.token)
    analysis = analyse(Path(summary["records_file"]), args.window_s)
    png = base.with_suffix(".png")
    plot(analysis, summary, png)
    result = {
        "scenario": "swap_under_load",
        **{k: v for k, v in summary.items() if k != "updater"},
        "updates_landed": summary["updater"]["landed"],
        "updater": summary["updater"],
        "window_s": args.window_s,
        "swap_windows": analysis["swaps"],
        "training_intervals": analysis["training_intervals"],
        "latency": analysis["latency"],
        "server_swaps": swap_counter_deltas(before, after),
        "bad_update": bad_update_outcome(summary, args.bad_update),
        "plot": str(png),
    }
    path = base.with_suffix(".json")
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(format_summary(summary))
    print_latency(analysis["latency"])
    print(f"wrote {path} and {png}")
    bad = result["bad_update"]
    if bad is not None:
        print(
            f"bad update (lr 10): job {bad['state']}, version {bad['version']}, "
            f"served to any prediction: {bad['served']}"
        )
    good = summary["updater"]["landed"] + (0 if bad is None else 1)
    if good < args.updates or (bad is not None and (bad["state"] != "rejected" or bad["served"])):
        print(
            f"{summary['updater']['landed']} of {args.updates} updates landed"
            + ("" if bad is None else f"; the bad one: {bad}"),
            file=sys.stderr,
        )
        sys.exit(2)
    return result


def bad_update_outcome(summary: dict[str, Any], index: int) -> dict[str, Any] | None:
    """What became of the diverging update: its job's state, its version, and whether any
    prediction of the run was answered by that version."""
    if index < 0:
        return None
    job = next((j for j in summary["updater"]["jobs"] if j.get("n") == index), None)
    if job is None:
        return {"state": "not posted", "version": None, "served": False}
    version = job.get("version")
    return {
        "state": job.get("state"),
        "version": version,
        "served": version is not None and version in summary["versions_seen"],
    }


if __name__ == "__main__":
    main()
