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


def analyse(records: Path, window_s: float) -> dict[str, Any]:
    reqs, jobs = read_records(records)
    predicts = [r for r in reqs if r["name"].startswith(PREDICT)]
    if not predicts:
        raise ValueError(f"no predictions recorded in {records}")
    t = np.array([r["t"] for r in predicts])
    ms = np.array([r["ms"] for r in predicts])
    ok = np.array([r["ok"] for r in predicts])
    ver = np.array([-1 if r["version"] is None else r["version"] for r in predicts])
    end = t + ms / 1000.0
    t0, t1 = float(t.min()), float(end.max())

    swaps: list[dict[str, Any]] = []
    training: list[tuple[float, float]] = []
    for j in sorted(
        (j for j in jobs if j.get("state") == "done"), key=lambda j: j.get("version") or 0
    ):
        v = int(j["version"])
        started, finished = _ts(j.get("started")), _ts(j.get("finished"))
        answered_new = ok & (ver >= v)
        first_seen = float(end[answered_new].min()) if answered_new.any() else None
        commit = finished if finished is not None else first_seen
        if started is not None and finished is not None:
            training.append((started, finished))
        if commit is None:
            continue
        stale = ok & (ver >= 0) & (ver < v) & (t >= commit)
        last_stale = float(t[stale].max()) if stale.any() else commit
        swaps.append(
            {
                "version": v,
                "class": j.get("class"),
                "commit": commit,
                "first_answer": first_seen,
                "first_answer_after_commit_s": None if first_seen is None else first_seen - commit,
                "last_stale_start_after_commit_s": last_stale - commit,
                "stale_answers_after_commit": int(stale.sum()),
                "window": [commit, max(commit, last_stale) + window_s],
                "train_seconds": None
                if started is None or finished is None
                else finished - started,
            }
        )

    def overlaps(a0: np.ndarray, a1: np.ndarray, spans: list[tuple[float, float]]) -> np.ndarray:
        m = np.zeros(a0.shape, dtype=bool)
        for a, b in spans:
            m |= (a0 <= b) & (a1 >= a)
        return m

    windows = [tuple(s["window"]) for s in swaps]
    in_swap = overlaps(t, end, windows)
    in_train = overlaps(t, end, training) & ~in_swap
    grid = np.arange(t0, t1, 0.01)
    g_swap = overlaps(grid, grid, windows)
    g_train = overlaps(grid, grid, training) & ~g_swap
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
            "failures": int((mask & ~ok).sum()),
            "seconds": seconds,
            "rps": float(mask.sum() / seconds) if seconds > 0 else None,
            **percentiles(ms[mask & ok]),
        }
    return {
        "window_s": window_s,
        "t0": t0,
        "swaps": swaps,
        "training_intervals": training,
        "latency": stats,
        "series": {"t": (t - t0).tolist(), "ms": ms.tolist(), "version": ver.tolist()},
        "ok": ok.tolist(),
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


def plot(analysis: dict[str, Any], summary: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = analysis["t0"]
    s = analysis["series"]
    t, ms, ver = np.array(s["t"]), np.array(s["ms"]), np.array(s["version"])
    ok = np.array(analysis["ok"])
    fig, ax = plt.subplots(figsize=(10, 4.8), dpi=120)
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
    cmap = plt.get_cmap("viridis")
    versions = sorted(set(ver[ver >= 0].tolist()))
    for k, v in enumerate(versions):
        m = (ver == v) & ok
        ax.scatter(
            t[m], ms[m], s=4, color=cmap(k / max(1, len(versions) - 1)), zorder=3, label=f"v{v}"
        )
    if (~ok).any():
        ax.scatter(t[~ok], ms[~ok], s=16, marker="x", color="red", zorder=4, label="failed")
    ax.set_yscale("log")
    ax.set_xlabel("seconds since the first prediction")
    ax.set_ylabel("prediction latency (ms)")
    lat = analysis["latency"]

    def p(name: str, q: str) -> str:
        v = lat[name][q]
        return "-" if v is None else f"{v:.0f}"

    ax.set_title(
        f"{summary['users']} users, {summary['workers'] or '?'} API workers, "
        f"{len(analysis['swaps'])} swaps; p95 {p('during_swaps', 'p95_ms')} ms during swaps, "
        f"{p('outside_swaps', 'p95_ms')} ms outside; {summary['failures']} failed",
        fontsize=9,
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=4, loc="upper left", markerscale=2)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
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
    p.add_argument("--out", type=Path, default=Path("results"))
    p.set_defaults(first_update_after=10.0)
    args = p.parse_args(argv)
    if args.updates < 1:
        p.error("--updates must be at least 1")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = args.out / f"swap_under_load_{stamp}"
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
        **locust_options(args),
    )
    after = swap_metrics(args.url, args.token)
    analysis = analyse(Path(summary["records_file"]), args.window_s)
    server_swaps = {
        k: None if before.get(k) is None or after.get(k) is None else after[k] - before[k]
        for k in after
    }
    if server_swaps.get("bsce_swap_duration_seconds_count"):
        server_swaps["mean_load_seconds"] = (
            server_swaps["bsce_swap_duration_seconds_sum"]
            / server_swaps["bsce_swap_duration_seconds_count"]
        )
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
        "server_swaps": server_swaps,
        "plot": str(png),
    }
    path = base.with_suffix(".json")
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(format_summary(summary))
    for name, st in analysis["latency"].items():
        print(
            f"  {name:>13}: {st['requests']:>6} predictions, {st['failures']} failed, "
            + ", ".join(
                f"{q} {'-' if st[q + '_ms'] is None else format(st[q + '_ms'], '.0f')} ms"
                for q in ("p50", "p95", "p99")
            )
            + f", {st['seconds']:.0f} s"
        )
    print(f"wrote {path} and {png}")
    if summary["updater"]["landed"] < args.updates:
        print(
            f"only {summary['updater']['landed']} of {args.updates} updates landed",
            file=sys.stderr,
        )
        sys.exit(2)
    return result


if __name__ == "__main__":
    main()
