#!/usr/bin/env python3
"""Collect one bench/replicated.sh run into a JSON file and a markdown table.

Input: a run directory with meta.json, one blk-bench JSON per measurement named
IDX__SERVER__WORKLOAD__BS__QD.json (or .error for a failed one), beside it
IDX__SERVER__WORKLOAD__BS__QD.peers.json (CPU of the servers on the other hosts), and
wire.md (wire-bench's table) or wire.error.

    python3 bench/replicated_report.py --run-dir bench/out/replicated-TS \
        --json out.json --markdown out.md

With several rounds each figure is the median over rounds. Ratios are against qsd-local
(one replica, no network) at the same workload: what replication costs. Below the table, the
replication targets of the issue, each computed from this run only:
  3-replica QD1 write p50 <= 1-replica p50 + 1.5 x the transport's 4k round trip
  3-replica QD32 write IOPS >= 2 x qsd-quorum's, and >= 0.5 x 1-replica's
  remote read QD1 p50 <= local read p50 + 1.5 x the transport's 4k round trip
"""

import argparse
import json
import os
import re
import statistics
import sys

# Replicas of the volume and where they are, per server kind.
REPLICAS = {
    "qsd-local": "1 (n1)",
    "qsd-quorum": "3 (n1, n2, n3)",
    "qsd-remote": "1 (n2)",
    "hcblk-1": "1 (n1)",
    "hcblk-3": "3 (n1, n2, n3)",
    "hcblk-remote": "1 (n2)",
}
REFERENCE = "qsd-local"
METRICS = ["iops", "p50_us", "p99_us", "server_cpu_pct", "server_cpu_us_per_io",
           "peer_cpu_pct", "client_runq_wait_pct", "server_runq_wait_pct"]
# As in plot.py: above this share of the interval waiting for its core, a row is disturbed.
RUNQ_WAIT_PCT_MAX = 2.0


def parse_name(fname):
    """IDX__SERVER__WORKLOAD__BS__QD.json|.error -> dict, or None for other files."""
    if fname.endswith(".peers.json"):
        return None
    stem, ext = os.path.splitext(fname)
    parts = stem.split("__")
    if ext not in (".json", ".error") or len(parts) != 5:
        return None
    idx, server, workload, bs, qd = parts
    try:
        return {"idx": int(idx), "server": server, "workload": workload,
                "bs": bs, "qd": int(qd), "ext": ext, "stem": stem}
    except ValueError:
        return None


def load(run_dir):
    """One record per measurement: identity plus metrics, or an error."""
    out = []
    for f in sorted(os.listdir(run_dir)):
        n = parse_name(f)
        if n is None:
            continue
        path = os.path.join(run_dir, f)
        if n["ext"] == ".error":
            with open(path) as fh:
                n["error"] = fh.read().strip()
            out.append(n)
            continue
        with open(path) as fh:
            d = json.load(fh)
        lat = d.get("lat_us") or {}
        n.update({
            "iops": d["iops"],
            "p50_us": lat.get("p50"),
            "p99_us": lat.get("p99"),
            "server_cpu_pct": d.get("server_cpu_pct"),
            "server_cpu_us_per_io": d.get("server_cpu_us_per_io"),
            "client_runq_wait_pct": d.get("client_runq_wait_pct"),
            "server_runq_wait_pct": d.get("server_runq_wait_pct"),
            "peer_cpu_pct": None,
        })
        peers = os.path.join(run_dir, n["stem"] + ".peers.json")
        if os.path.exists(peers):
            with open(peers) as fh:
                n["peer_cpu_pct"] = json.load(fh)["peer_cpu_pct"]
        out.append(n)
    return out


def summarise(records, servers, workloads):
    """Median per (workload, server), in the run's order."""
    rows = []
    for w in workloads:
        wl, bs, qd = w.split(":")
        for s in servers:
            rs = [r for r in records
                  if (r["server"], r["workload"], r["bs"], r["qd"]) == (s, wl, bs, int(qd))]
            row = {"workload": f"{wl}-{bs}-qd{qd}", "server": s,
                   "replicas": REPLICAS.get(s, "?"), "rounds": len(rs)}
            ok = [r for r in rs if "error" not in r]
            row["errors"] = [r["error"] for r in rs if "error" in r]
            for m in METRICS:
                vals = [r[m] for r in ok if r.get(m) is not None]
                row[m] = statistics.median(vals) if vals else None
            # With peers on n1's server core (the default on 2 cores), n1's server waits
            # for them by design; only the client's core must be its own then.
            waits = [row["client_runq_wait_pct"]]
            if row["peer_cpu_pct"] is None:
                waits.append(row["server_runq_wait_pct"])
            row["disturbed"] = any(v is not None and v > RUNQ_WAIT_PCT_MAX for v in waits)
            rows.append(row)
    for row in rows:
        ref = next((r for r in rows
                    if r["workload"] == row["workload"] and r["server"] == REFERENCE), None)
        for m in ("iops", "p50_us"):
            a, b = row[m], ref[m] if ref else None
            row[m + "_x_local"] = a / b if a is not None and b else None
    return rows


def wire_p50_us(wire, case):
    """p50 µs of a one-sided QD1 case ("4 KiB WRITE" / "4 KiB READ") in wire-bench's table."""
    if not wire:
        return None
    m = re.search(re.escape(case) + r" QD1 p50 / p99 \| ([0-9.]+) / [0-9.]+ µs", wire)
    return float(m.group(1)) if m else None


def targets(rows, wire):
    """The issue's targets as (what, value, limit, ok) rows; None where a figure is missing."""
    def get(server, workload, metric):
        r = next((r for r in rows if r["server"] == server and r["workload"] == workload), None)
        return r[metric] if r else None

    rtt_w = wire_p50_us(wire, "4 KiB WRITE")
    rtt_r = wire_p50_us(wire, "4 KiB READ")
    out = []
    w1, w3 = get("hcblk-1", "randwrite-4k-qd1", "p50_us"), get("hcblk-3", "randwrite-4k-qd1", "p50_us")
    if None not in (w1, w3, rtt_w):
        limit = w1 + 1.5 * rtt_w
        out.append(("3-replica 4k write QD1 p50 ≤ 1-replica p50 + 1.5 × round trip",
                    f"{w3:.1f} µs", f"{w1:.1f} + 1.5 × {rtt_w:.1f} = {limit:.1f} µs", w3 <= limit))
    i3, iq, i1 = (get("hcblk-3", "randwrite-4k-qd32", "iops"), get("qsd-quorum", "randwrite-4k-qd32", "iops"),
                  get("hcblk-1", "randwrite-4k-qd32", "iops"))
    if None not in (i3, iq):
        out.append(("3-replica 4k write QD32 IOPS ≥ 2 × qsd-quorum", f"{i3:,.0f} ({i3 / iq:.2f}×)",
                    f"2 × {iq:,.0f} = {2 * iq:,.0f}", i3 >= 2 * iq))
    if None not in (i3, i1):
        out.append(("3-replica 4k write QD32 IOPS ≥ 0.5 × 1-replica", f"{i3:,.0f} ({i3 / i1:.2f}×)",
                    f"0.5 × {i1:,.0f} = {0.5 * i1:,.0f}", i3 >= 0.5 * i1))
    rl, rr = get("hcblk-1", "randread-4k-qd1", "p50_us"), get("hcblk-remote", "randread-4k-qd1", "p50_us")
    if None not in (rl, rr, rtt_r):
        limit = rl + 1.5 * rtt_r
        out.append(("remote 4k read QD1 p50 ≤ local p50 + 1.5 × round trip", f"{rr:.1f} µs",
                    f"{rl:.1f} + 1.5 × {rtt_r:.1f} = {limit:.1f} µs", rr <= limit))
    return out


def fmt(v, digits=2):
    if v is None:
        return "–"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.1f}"
    return f"{v:.{digits}f}"


def markdown(meta, rows, wire):
    lines = [
        f"Run {meta['timestamp']} (git {meta['git']}), {meta['cpu_model']} ×{meta['nproc']}, "
        f"kernel {meta['kernel']}, {meta['qemu_storage_daemon']}.",
        f"Hosts n1 {meta['hosts']['n1']}, n2 {meta['hosts']['n2']}, n3 {meta['hosts']['n3']} "
        "(network namespaces on one bridge); volume attached on n1. "
        f"n1's server on core {meta['server_cpu']}, other hosts' servers on "
        f"{('core ' + meta['peer_cpu']) if meta['peer_cpu'] else 'any core'}, client (blk-bench) "
        f"on core {meta['client_cpu']}; {meta['seconds']} s measured after {meta['warmup']} s "
        f"warmup, {meta['rounds']} round(s){', median' if meta['rounds'] > 1 else ''}; "
        f"images {meta['size']}. quorum: vote-threshold={meta['quorum']['vote_threshold']}, "
        f"read-pattern={meta['quorum']['read_pattern']}.",
        "",
        f"Command: `{meta['command']}`",
        "",
        "| workload | server | replicas | IOPS | p50 µs | p99 µs | n1 server CPU % "
        "| n1 CPU µs/IO | peers' CPU % | IOPS × local | p50 × local | waited % client / server |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["errors"] and r["iops"] is None:
            lines.append(f"| {r['workload']} | {r['server']} | {r['replicas']} | failed: "
                         f"{r['errors'][0].splitlines()[-1] if r['errors'][0] else '?'} "
                         "| | | | | | | | |")
            continue
        mark = " ⚠" if r["disturbed"] else ""
        lines.append(
            f"| {r['workload']} | {r['server']}{mark} | {r['replicas']} | {fmt(r['iops'])} "
            f"| {fmt(r['p50_us'])} | {fmt(r['p99_us'])} | {fmt(r['server_cpu_pct'], 1)} "
            f"| {fmt(r['server_cpu_us_per_io'], 3)} | {fmt(r['peer_cpu_pct'], 1)} "
            f"| {fmt(r['iops_x_local'])} | {fmt(r['p50_us_x_local'])} "
            f"| {fmt(r['client_runq_wait_pct'], 1)} / {fmt(r['server_runq_wait_pct'], 1)} |")
    if any(r["disturbed"] for r in rows):
        lines.append(f"\n⚠ the client (or the server of a single-host row) waited for its core "
                     f"more than {RUNQ_WAIT_PCT_MAX:.0f} % of the interval: other work took "
                     "from the measurement; rerun those rows.")
    lines.append("")
    lines.append("Peers' CPU: the servers on the other hosts (n2, n3), summed, as % of one core, "
                 "over the whole blk-bench run (warmup included). Where the peers share n1's "
                 "server core, n1's \"waited\" includes waiting for them.")
    lines.append("")
    lines.append("Transport round trip n1 → n2, same namespaces (wire-bench client/serve):")
    lines.append("")
    lines.append(wire.rstrip() if wire else "(not measured)")
    t = targets(rows, wire)
    if t:
        lines.append("")
        lines.append("Replication targets, from this run:")
        lines.append("")
        lines.append("| target | measured | limit | |")
        lines.append("|---|---:|---:|---|")
        for what, value, limit, ok in t:
            lines.append(f"| {what} | {value} | {limit} | {'✅' if ok else '❌'} |")
    return "\n".join(lines) + "\n"


def plot(rows, png, title):
    """IOPS and p50 (whisker to p99) per workload, one bar per server kind, log scales."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["rounds"] > 0]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    servers = list(dict.fromkeys(r["server"] for r in rows))
    index = {(r["workload"], r["server"]): r for r in rows}
    width = 0.8 / max(len(servers), 1)
    fig, axes = plt.subplots(2, 1, figsize=(12, 9))
    for ax, metric, label in ((axes[0], "iops", "IOPS (log)"),
                              (axes[1], "p50_us", "p50 latency µs (log); whisker to p99")):
        for i, server in enumerate(servers):
            xs, ys, err = [], [], []
            for k, w in enumerate(workloads):
                r = index.get((w, server))
                if r is None or r.get(metric) is None:
                    continue
                xs.append(k + (i - (len(servers) - 1) / 2) * width)
                ys.append(r[metric])
                err.append(max((r.get("p99_us") or r[metric]) - r[metric], 0))
            kwargs = {"yerr": [[0] * len(err), err], "capsize": 2} if metric == "p50_us" else {}
            ax.bar(xs, ys, width, label=f"{server} ({REPLICAS.get(server, '?')})", **kwargs)
        ax.set_xticks(range(len(workloads)))
        ax.set_xticklabels(workloads)
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, ncol=3, fontsize=9, loc="upper center", bbox_to_anchor=(0.5, 0.96))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    ap.add_argument("--png")
    a = ap.parse_args()
    with open(os.path.join(a.run_dir, "meta.json")) as fh:
        meta = json.load(fh)
    with open(os.path.join(a.run_dir, "loadavg-end")) as fh:
        meta["loadavg_end"] = fh.read().split()[:3]
    rows = summarise(load(a.run_dir), meta["servers"], meta["workloads"])
    wire = None
    for name in ("wire.md", "wire.error"):
        p = os.path.join(a.run_dir, name)
        if os.path.exists(p):
            with open(p) as fh:
                wire = fh.read() if name == "wire.md" else "failed: " + fh.read().strip()
            break
    md = markdown(meta, rows, wire)
    if a.markdown:
        with open(a.markdown, "w") as fh:
            fh.write(md)
    else:
        print(md, end="")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows, "wire_markdown": wire,
                       "targets": [{"target": w, "measured": v, "limit": l, "ok": ok}
                                   for w, v, l, ok in targets(rows, wire)]}, fh, indent=2)
    if a.png:
        try:
            plot(rows, a.png, f"replicated volumes, 3 hosts in namespaces, {meta.get('timestamp', '')}")
        except ImportError as e:
            print(f"replicated_report.py: no chart ({e}); install python3-matplotlib", file=sys.stderr)


if __name__ == "__main__":
    main()
