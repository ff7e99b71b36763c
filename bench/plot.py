#!/usr/bin/env python3
"""Collect one bench/run.sh run into a JSON file, a markdown table and a PNG chart.

Input: a run directory with meta.json and one file per measurement named
IDX__SERVER__WORKLOAD__BS__QD.json (blk-bench or fio JSON) or .error (a failed measurement).

    python3 bench/plot.py --run-dir bench/out/run-TS --json out.json --png out.png --markdown out.md

Ratios are against qemu-storage-daemon on the same kind of backend: null-co for hcblk's
null and ram volumes, the io_uring O_DIRECT file export for hcblk's file volume and for fio.
Servers named hcblk-BACKING-MODE (a poll mode) are compared with the same server run from
$HCBLK_BASE (hcblk-BACKING-MODE-base) if the run has it, else with hcblk-BACKING-never (on a
shared core, hcblk-BACKING-never first).
With several rounds, each figure is the median over rounds.

With server and client on one core (the shared-core run), the waits of the two are mostly
for each other, so no row is marked disturbed, and the criteria are the shared-core ones.
"""

import argparse
import json
import os
import re
import statistics
import sys

# Which qemu-storage-daemon configuration each server is compared with.
REFERENCE = {
    "qsd-null": "qsd-null",
    "hcblk-null": "qsd-null",
    "hcblk-ram": "qsd-null",
    "qsd-file": "qsd-file",
    "hcblk-file": "qsd-file",
    "fio-host": "qsd-file",
    "fio-server-core": "qsd-file",
}
SERVER_ORDER = ["qsd-null", "hcblk-null", "hcblk-ram", "qsd-file", "hcblk-file", "fio-host", "fio-server-core"]
# hcblk-BACKING-MODE[-base]: an hcblk server with an explicit poll mode, from $HCBLK or
# (-base) $HCBLK_BASE.
HCBLK_MODE = re.compile(r"hcblk-(null|ram|file)-(always|adaptive|never)(-base)?")
MODE_ORDER = ["never", "adaptive", "always"]


def references(server, shared_core=False):
    """The servers `server` is compared with, best first (the first one in the run is used).
    On a shared core, polling is judged against not polling: hcblk-BACKING-never first."""
    if server in REFERENCE:
        return [REFERENCE[server]]
    m = HCBLK_MODE.fullmatch(server)
    if not m:
        return []
    backing, mode, base = m.groups()
    never = f"hcblk-{backing}-never{base or ''}"
    same_build = [f"{server}-base"] if not base else []
    others = [never] if never != server else []
    return others + same_build if shared_core else same_build + others


def order_key(server):
    if server in SERVER_ORDER:
        return (SERVER_ORDER.index(server), "", 0, 0)
    m = HCBLK_MODE.fullmatch(server)
    if m:
        backing, mode, base = m.groups()
        return (len(SERVER_ORDER), backing, MODE_ORDER.index(mode), 0 if base else 1)
    return (len(SERVER_ORDER) + 1, server, 0, 0)
METRICS = ["iops", "mib_s", "p50_us", "p99_us", "p999_us",
           "server_cpu_us_per_io", "server_cpu_pct", "client_cpu_pct",
           "client_preemptions_per_s", "client_runq_wait_pct", "server_runq_wait_pct",
           "pair_cpu_us_per_io"]
# Client and server should own their cores. Above this share of the interval spent waiting
# for its core (other tasks ran there) by either, the row is disturbed.
RUNQ_WAIT_PCT_MAX = 2.0
# On a shared core, client and server together should get the whole core (the client never
# sleeps); below this share other tasks ran there.
PAIR_CPU_PCT_MIN = 95.0


def pair_disturbed(r):
    c, s = r.get("client_cpu_pct"), r.get("server_cpu_pct")
    return c is not None and s is not None and c + s < PAIR_CPU_PCT_MIN


def parse_name(fname):
    """IDX__SERVER__WORKLOAD__BS__QD.ext -> dict, or None for other files."""
    stem, ext = os.path.splitext(fname)
    parts = stem.split("__")
    if ext not in (".json", ".error") or len(parts) != 5:
        return None
    idx, server, workload, bs, qd = parts
    try:
        return {"idx": int(idx), "server": server, "workload": workload,
                "bs": bs, "qd": int(qd), "ext": ext}
    except ValueError:
        return None


def pair_cpu_us_per_io(d):
    """Core time one I/O cost client and server together: on a shared core, what other load
    takes from the pair changes IOPS much more than this."""
    c, s, iops = d.get("client_cpu_pct"), d.get("server_cpu_pct"), d.get("iops")
    return (c + s) / 100 * 1e6 / iops if c is not None and s is not None and iops else None


def from_blk_bench(d):
    lat = d.get("lat_us") or {}
    return {
        "pair_cpu_us_per_io": pair_cpu_us_per_io(d),
        "iops": d["iops"],
        "mib_s": d["mib_per_s"],
        "p50_us": lat.get("p50"),
        "p99_us": lat.get("p99"),
        "p999_us": lat.get("p999"),
        "server_cpu_us_per_io": d.get("server_cpu_us_per_io"),
        "server_cpu_pct": d.get("server_cpu_pct"),
        "client_cpu_pct": d.get("client_cpu_pct"),
        "client_preemptions_per_s": d.get("client_preemptions_per_s"),
        "client_runq_wait_pct": d.get("client_runq_wait_pct"),
        "server_runq_wait_pct": d.get("server_runq_wait_pct"),
        "seconds": d.get("elapsed_s"),
    }


def from_fio(d):
    job = d["jobs"][0]
    side = job["write"] if job["write"]["io_bytes"] > 0 else job["read"]
    pct = side["lat_ns"].get("percentile", {})

    def us(key):
        return pct[key] / 1000.0 if key in pct else None

    return {
        "iops": side["iops"],
        "mib_s": side["bw_bytes"] / (1 << 20),
        "p50_us": us("50.000000"),
        "p99_us": us("99.000000"),
        "p999_us": us("99.900000"),
        # The "server" is the kernel; its CPU is not separable from fio's own.
        "server_cpu_us_per_io": None,
        "server_cpu_pct": None,
        "client_cpu_pct": job["usr_cpu"] + job["sys_cpu"],
        # fio reports context switches of all kinds; it sleeps in io_uring_enter by design.
        "client_preemptions_per_s": None,
        "client_runq_wait_pct": None,
        "server_runq_wait_pct": None,
        "pair_cpu_us_per_io": None,
        "seconds": job["job_runtime"] / 1000.0,
    }


def load_run(run_dir):
    runs = []
    for fname in sorted(os.listdir(run_dir)):
        meta = parse_name(fname)
        if meta is None:
            continue
        path = os.path.join(run_dir, fname)
        rec = {k: meta[k] for k in ("idx", "server", "workload", "bs", "qd")}
        rec["key"] = f"{meta['workload']}-{meta['bs']}-qd{meta['qd']}"
        if meta["ext"] == ".error":
            with open(path) as f:
                rec["error"] = f.read().strip()[-2000:]
        else:
            with open(path) as f:
                d = json.load(f)
            if d.get("tool") == "blk-bench":
                rec.update(from_blk_bench(d))
            elif "fio version" in d:
                rec.update(from_fio(d))
            else:
                rec["error"] = f"unrecognised result file {fname}"
        runs.append(rec)
    return runs


def summarise(runs, shared_core=False):
    """Median per (key, server) over the successful rounds."""
    groups = {}
    for r in runs:
        groups.setdefault((r["key"], r["server"]), []).append(r)
    summary = []
    for (key, server), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        pair_left_out = 0
        if shared_core:
            # Rounds where other tasks took part of the core measure them, not the servers:
            # left out of the medians when the row has undisturbed rounds.
            quiet = [r for r in ok if not pair_disturbed(r)]
            pair_left_out = len(ok) - len(quiet) if quiet else 0
            ok = quiet or ok
        s = {"key": key, "server": server, "workload": rs[0]["workload"],
             "bs": rs[0]["bs"], "qd": rs[0]["qd"], "rounds": len(ok),
             "failed": len(rs) - len(ok) - pair_left_out, "left_out": pair_left_out}
        for m in METRICS:
            vals = [r[m] for r in ok if r.get(m) is not None]
            s[m] = statistics.median(vals) if vals else None
        if shared_core:
            s["disturbed"] = all(pair_disturbed(r) for r in ok) if ok else False
        else:
            s["disturbed"] = any(
                s[m] is not None and s[m] > RUNQ_WAIT_PCT_MAX
                for m in ("client_runq_wait_pct", "server_runq_wait_pct"))
        summary.append(s)
    index = {(s["key"], s["server"]): s for s in summary}
    for s in summary:
        ref = next((index[(s["key"], r)] for r in references(s["server"], shared_core)
                    if (s["key"], r) in index), None)
        s["reference"] = ref["server"] if ref else None
        for m, name in (("iops", "iops_ratio"), ("p50_us", "p50_ratio"),
                        ("server_cpu_us_per_io", "cpu_per_io_ratio")):
            a, b = s.get(m), ref.get(m) if ref else None
            s[name] = a / b if a is not None and b else None
    summary.sort(key=lambda s: (s["workload"] == "idle", s["key"], order_key(s["server"])))
    return summary


def criteria(summary, shared_core=False):
    index = {(s["key"], s["server"]): s for s in summary}

    def get(key, server, metric):
        s = index.get((key, server))
        return None if s is None else s.get(metric)

    def disturbed(*pairs):
        return any(index.get(p, {}).get("disturbed") for p in pairs)

    def check(name, value, op, limit, how, rows=()):
        if value is None:
            verdict = "MISSING"
        else:
            verdict = "PASS" if (value >= limit if op == ">=" else value < limit
                                 if op == "<" else value <= limit) else "FAIL"
        if value is not None and disturbed(*rows):
            verdict += " (disturbed)"
        return {"criterion": name, "value": value, "op": op, "limit": limit,
                "how": how, "verdict": verdict}

    def ratio(a, b):
        return a / b if a is not None and b else None

    if shared_core:
        # Issue 7: the default must not starve a client that shares the poller's core.
        qd1 = [("randread-4k-qd1", "hcblk-null-adaptive"), ("randread-4k-qd1", "hcblk-null-never")]
        qd32 = [("randread-4k-qd32", "hcblk-null-adaptive"), ("randread-4k-qd32", "hcblk-null-never")]
        return [
            check("shared core: hcblk null 4k randread QD1 p50, adaptive / never",
                  ratio(get(*qd1[0], "p50_us"), get(*qd1[1], "p50_us")), "<=", 1.5,
                  "p50 latency ratio"),
            check("shared core: hcblk null 4k randread QD32 IOPS, adaptive / never",
                  ratio(get(*qd32[0], "iops"), get(*qd32[1], "iops")), ">=", 1.0,
                  "IOPS ratio"),
        ]
    # A/B against another build ($HCBLK_BASE), where the run has such rows.
    ab = []
    for s in summary:
        m = HCBLK_MODE.fullmatch(s["server"])
        if not m or m.group(3) or s.get("reference") != f"{s['server']}-base":
            continue
        rows = [(s["key"], s["server"]), (s["key"], s["reference"])]
        if s["qd"] == 1:
            ab.append(check(f"{s['server']} {s['key']} p50 / base build", s.get("p50_ratio"),
                            "<=", 1.05, "p50 latency ratio", rows))
        else:
            ab.append(check(f"{s['server']} {s['key']} IOPS / base build", s.get("iops_ratio"),
                            ">=", 0.95, "IOPS ratio", rows))
    if ab and not any(s["server"] in REFERENCE for s in summary):
        return ab
    # The file path at depth (issue 7), against host fio on the same image and, for CPU per
    # I/O, qemu-storage-daemon: for the bench's polling server (`always`) and, where the run
    # has it, the daemon's default mode (`adaptive`).
    file_checks = []
    seq = "seqread-128k-qd8"
    for server in ("hcblk-file", "hcblk-file-adaptive"):
        if not any(s["server"] == server for s in summary):
            continue
        for key, metric, op, limit, against, how in [
                ("randread-4k-qd32", "iops", ">=", 0.95, "fio-host", "IOPS ratio"),
                ("randwrite-4k-qd32", "iops", ">=", 0.9, "fio-host", "IOPS ratio"),
                (seq, "iops", ">=", 0.95, "fio-host", "IOPS ratio"),
                (seq, "p99_us", "<=", 2.0, "fio-host", "p99 latency ratio"),
                (seq, "server_cpu_us_per_io", "<=", 1.0, "qsd-file", "server CPU per I/O ratio")]:
            label = {"iops": "IOPS", "p99_us": "p99", "server_cpu_us_per_io": "server CPU/IO"}[metric]
            file_checks.append(check(
                f"{server} {key} {label} / {'host fio io_uring O_DIRECT' if against == 'fio-host' else against}",
                ratio(get(key, server, metric), get(key, against, metric)), op, limit, how,
                [(key, server), (key, against)]))
    return ab + [
        check("hcblk null 4k randread QD32 IOPS / qsd null-co",
              ratio(get("randread-4k-qd32", "hcblk-null", "iops"),
                    get("randread-4k-qd32", "qsd-null", "iops")), ">=", 2.0,
              "IOPS ratio",
              [("randread-4k-qd32", "hcblk-null"), ("randread-4k-qd32", "qsd-null")]),
        check("hcblk null 4k randread QD1 p50 / qsd null-co",
              ratio(get("randread-4k-qd1", "hcblk-null", "p50_us"),
                    get("randread-4k-qd1", "qsd-null", "p50_us")), "<=", 0.5,
              "p50 latency ratio",
              [("randread-4k-qd1", "hcblk-null"), ("randread-4k-qd1", "qsd-null")]),
    ] + file_checks + [
        check("hcblk idle volume, --poll adaptive: daemon CPU % of a core",
              get("idle-4k-qd1", "hcblk-file", "server_cpu_pct"), "<", 5.0,
              "percent of one core"),
    ]


def fmt(v, digits=2):
    if v is None:
        return "–"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def markdown(meta, summary, checks):
    lines = []
    lines.append(f"Run {meta.get('timestamp', '?')} (git {meta.get('git', '?')}), "
                 f"{meta.get('cpu_model', '?')} ×{meta.get('nproc', '?')}, "
                 f"kernel {meta.get('kernel', '?')}, {meta.get('qemu_storage_daemon', '?')}, "
                 f"{meta.get('fio', '?')}.")
    if meta.get("server_cpu") is not None and meta.get("server_cpu") == meta.get("client_cpu"):
        lines.append("**Shared core:** server and client on the same core; the waited column is "
                     "mostly each waiting for the other. Rounds where the two together got less "
                     f"than {PAIR_CPU_PCT_MIN:.0f} % of the core (other tasks ran there) are left "
                     "out of the medians when the row has other rounds (count in the second table); "
                     "a row with only such rounds is marked ⚠.")
    lines.append(f"Servers pinned to core {meta.get('server_cpu')}, client (blk-bench: libblkio "
                 f"virtio-blk-vhost-user, busy-polled queue) to core {meta.get('client_cpu')}; "
                 f"{meta.get('seconds')} s measured after {meta.get('warmup')} s warmup, "
                 f"{meta.get('rounds')} round(s), median; image {meta.get('size')}. "
                 f"Load average at start {' '.join(meta.get('loadavg_start', ['?']))}, "
                 f"at end {' '.join(meta.get('loadavg_end', ['?']))}.")
    lines.append("")
    lines.append("Command: `" + meta.get("command", "bench/run.sh") + "`")
    lines.append("")
    lines.append("| workload | server | IOPS | MiB/s | p50 µs | p99 µs | p99.9 µs "
                 "| server CPU µs/IO | server CPU % | IOPS × ref | p50 × ref | CPU/IO × ref "
                 "| ref | waited % client / server |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for s in summary:
        if s["workload"] == "idle":
            continue
        if s["rounds"] == 0:
            lines.append(f"| {s['key']} | {s['server']} | FAILED | | | | | | | | | | | |")
            continue
        lines.append(
            f"| {s['key']} | {s['server']} | {fmt(s['iops'], 0)} | {fmt(s['mib_s'], 1)} "
            f"| {fmt(s['p50_us'])} | {fmt(s['p99_us'])} | {fmt(s['p999_us'])} "
            f"| {fmt(s['server_cpu_us_per_io'], 3)} | {fmt(s['server_cpu_pct'], 1)} "
            f"| {fmt(s['iops_ratio'])} | {fmt(s['p50_ratio'])} | {fmt(s['cpu_per_io_ratio'])} "
            f"| {s['reference'] or '–'} "
            f"| {fmt(s['client_runq_wait_pct'], 1)} / {fmt(s['server_runq_wait_pct'], 1)}"
            f"{' ⚠' if s['disturbed'] else ''} |")
    if any(s["disturbed"] for s in summary):
        lines.append("")
        lines.append(f"⚠ client or server waited for its core more than {RUNQ_WAIT_PCT_MAX:.0f} % "
                     "of the time (other tasks ran there): that row is disturbed; rerun it.")
    if meta.get("server_cpu") is not None and meta.get("server_cpu") == meta.get("client_cpu"):
        lines.append("")
        lines.append("Shared core, load-independent view: CPU of client and server together per I/O "
                     "(what the core spent on each I/O; other load on the core changes IOPS, not this), "
                     "and the share of the core the pair got.")
        lines.append("")
        lines.append("| workload | server | client + server CPU µs/IO | × ref | client + server CPU % "
                     "| rounds used / left out |")
        lines.append("|---|---|---:|---:|---:|---:|")
        index = {(s["key"], s["server"]): s for s in summary}
        for s in summary:
            if s["workload"] == "idle" or s["rounds"] == 0:
                continue
            ref = index.get((s["key"], s["reference"])) if s["reference"] else None
            r = (s["pair_cpu_us_per_io"] / ref["pair_cpu_us_per_io"]
                 if ref and ref.get("pair_cpu_us_per_io") and s["pair_cpu_us_per_io"] else None)
            pct = (s["client_cpu_pct"] or 0) + (s["server_cpu_pct"] or 0)
            lines.append(f"| {s['key']} | {s['server']} | {fmt(s['pair_cpu_us_per_io'], 3)} "
                         f"| {fmt(r)} | {fmt(pct, 1)} | {s['rounds']} / {s['left_out']} |")
    idle = [s for s in summary if s["workload"] == "idle"]
    if idle:
        lines.append("")
        lines.append(f"Idle: client connected, queue started, no I/O for "
                     f"{meta.get('idle_seconds')} s after {meta.get('warmup')} s of QD1 reads "
                     f"(hcblk with `--poll adaptive`).")
        lines.append("")
        lines.append("| server | server CPU % of one core |")
        lines.append("|---|---:|")
        for s in idle:
            val = "FAILED" if s["rounds"] == 0 else fmt(s["server_cpu_pct"], 2)
            lines.append(f"| {s['server']} | {val} |")
    lines.append("")
    lines.append("| criterion | measured | target | verdict |")
    lines.append("|---|---:|---|---|")
    for c in checks:
        lines.append(f"| {c['criterion']} | {fmt(c['value'], 3)} | {c['op']} {c['limit']} "
                     f"| {c['verdict']} |")
    return "\n".join(lines) + "\n"


def plot(summary, png, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s for s in summary if s["workload"] != "idle" and s["rounds"] > 0]
    keys = sorted({s["key"] for s in rows}, key=lambda k: [s["key"] for s in summary].index(k))
    servers = sorted({s["server"] for s in rows}, key=order_key)
    index = {(s["key"], s["server"]): s for s in rows}
    width = 0.8 / max(len(servers), 1)

    fig, axes = plt.subplots(3, 1, figsize=(12, 12))
    panels = [
        ("iops", "IOPS (log)", True),
        ("p50_us", "p50 latency µs (log); whisker to p99", True),
        ("server_cpu_us_per_io", "server CPU µs per I/O (log)", True),
    ]
    for ax, (metric, label, log) in zip(axes, panels):
        for i, server in enumerate(servers):
            xs, ys, err = [], [], []
            for k, key in enumerate(keys):
                s = index.get((key, server))
                if s is None or s.get(metric) is None:
                    continue
                xs.append(k + (i - (len(servers) - 1) / 2) * width)
                ys.append(s[metric])
                if metric == "p50_us":
                    err.append(max((s.get("p99_us") or s[metric]) - s[metric], 0))
            kwargs = {"yerr": [[0] * len(err), err], "capsize": 2} if metric == "p50_us" else {}
            ax.bar(xs, ys, width, label=server, **kwargs)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(keys)
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, ncol=len(servers), fontsize=9, loc="upper center",
               bbox_to_anchor=(0.5, 0.965))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--json")
    ap.add_argument("--png")
    ap.add_argument("--markdown")
    args = ap.parse_args()

    meta_path = os.path.join(args.run_dir, "meta.json")
    meta = {}
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
    end = os.path.join(args.run_dir, "loadavg-end")
    if os.path.exists(end):
        with open(end) as f:
            meta["loadavg_end"] = f.read().split()[:3]
    runs = load_run(args.run_dir)
    if not runs:
        sys.exit(f"no measurements in {args.run_dir}")
    shared_core = meta.get("server_cpu") is not None and meta.get("server_cpu") == meta.get("client_cpu")
    summary = summarise(runs, shared_core)
    checks = criteria(summary, shared_core)
    md = markdown(meta, summary, checks)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "summary": summary, "criteria": checks, "runs": runs},
                      f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md)
    else:
        sys.stdout.write(md)
    if args.png:
        try:
            plot(summary, args.png, f"hcblk vs qemu-storage-daemon, {meta.get('timestamp', '')}")
        except ImportError as e:
            print(f"plot.py: no chart ({e}); install python3-matplotlib", file=sys.stderr)


if __name__ == "__main__":
    main()
