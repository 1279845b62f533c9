#!/usr/bin/env python3
"""ucgm_fast benchmark: the eager reference vs torch.compile of it vs the fused op, row by row.

    python benchmarks/run.py [--device cpu|cuda] [--quick] [--ops OP ...] [--json PATH]

Prints one table (op, shape, dtype, eager / compile / fused time, speedups, GB/s, % of the copy
bandwidth measured in the same run at the row's size, max relative error against the float64
reference) and writes benchmarks/results/<device>.json, .md and a .png chart of the speedups.
Progress goes to stderr. Op groups live in benchmarks/cases/ (one module each); a group that needs
a third-party package that is not installed is skipped with the reason (an op missing from
ucgm_fast is an error). Exit status 1 when a row fails or its error is over its bound; 2 when
--ops names a group that was skipped or matches nothing; 130 when interrupted (Ctrl-C or
SIGTERM), after writing the rows measured so far.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402

from harness import accuracy, report, timing  # noqa: E402
from harness.case import Case, Plan, collect, discover  # noqa: E402
from harness.env import environment, steady_malloc  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="where to run (default: cuda when available, else cpu)")
    p.add_argument("--quick", action="store_true",
                   help="a small set: two transports, one training size and the large size (< 3 min on 2 CPU cores)")
    p.add_argument("--sizes", choices=["default", "smallest"], default="default",
                   help="'smallest': one tiny float32 shape per op, to check that the harness runs")
    p.add_argument("--ops", nargs="+", metavar="OP", help="only these ops or op groups (e.g. decode, transport)")
    p.add_argument("--match", metavar="REGEX", help="only rows whose op/variant/shape/dtype matches, e.g. 'decode/EDM/.*/float32'")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer (its compilation is slow)")
    p.add_argument("--no-extra-peers", action="store_true", help="skip optional peers (Numba, CuPy)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list here")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"), help="where <name>.json/.md/.png go")
    p.add_argument("--name", help="file stem of the result files (default: the device, cpu or cuda)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--keep-malloc", action="store_true",
                   help="leave glibc's malloc thresholds alone (by default they are fixed so that fresh outputs "
                        "do not page-fault on every call; see harness/env.py steady_malloc)")
    p.add_argument("--list", action="store_true", help="list the rows that would run, and exit")
    p.add_argument("--redraw", nargs="+", metavar="JSON",
                   help="draw <stem>.png (and relink <stem>.md) from results an earlier run wrote, and exit")
    return p.parse_args(argv)


def _progress(msg: str, end: str = "\n") -> None:
    sys.stderr.write(msg + end)
    sys.stderr.flush()


def _configure_compile() -> None:
    # One compiled wrapper per reference function serves every row; dynamo keeps one graph per
    # (shape, dtype, transport). The default limit of 8 graphs per function would silently send
    # later rows back to eager, so lift it above the number of rows.
    import torch._dynamo.config as dynamo_config
    for name, value in (("recompile_limit", 10_000), ("cache_size_limit", 10_000),
                        ("accumulated_recompile_limit", 100_000), ("accumulated_cache_size_limit", 100_000)):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, value)


class CompileCache:
    """torch.compile wrappers, one per function; dynamo caches one graph per shape under each."""

    def __init__(self):
        self._fns = {}

    def get(self, fn):
        key = id(fn)
        if key not in self._fns:
            self._fns[key] = (fn, torch.compile(fn, dynamic=False))
        return self._fns[key][1]


def _timing_fields(prefix: str, t: timing.Timing) -> dict:
    return {f"{prefix}_ms": t.median_ms, f"{prefix}_min_ms": t.min_ms, f"{prefix}_max_ms": t.max_ms,
            f"{prefix}_repeats": t.repeats, f"{prefix}_inner": t.inner}


def _err(out, ref):
    return None if ref is None else accuracy.max_rel_err(out, ref)


class CopyBandwidth:
    """``dst.copy_(src)`` bandwidth per row size, each measured once (on first use) and kept.

    A row's % copy compares it with a copy whose tensors are as large as the row's (its shape in
    its dtype) and timed with the same cache-flush decision: one copy at the largest size would
    hold a small row, whose data sits in cache, to a DRAM-bound figure. Results are cached by
    (float32 elements, flush): rows of one size share one measurement.
    """

    def __init__(self, device: torch.device, budget: timing.Budget, flusher):
        self.device, self.budget, self.flusher = device, budget, flusher
        self.measured: dict = {}

    def __call__(self, numel: int, flush: bool) -> dict:
        """The copy of ``numel`` float32 elements (flushed before each sample when ``flush``)."""
        key = (max(int(numel), 1), bool(flush and self.flusher is not None))
        if key not in self.measured:
            self.measured[key] = timing.copy_bandwidth(key[0], self.device, self.budget, self.flusher,
                                                       flush=key[1])
        return self.measured[key]

    def for_row(self, case: Case, flush: bool) -> dict:
        """The copy whose tensors hold as many bytes as one of the row's (``case.shape`` in its dtype)."""
        return self(-(-case.numel * case.dtype.itemsize // 4), flush)


def run_case(case: Case, args: argparse.Namespace, device: torch.device, budget: timing.Budget,
             flusher, compiled: CompileCache, copies: CopyBandwidth | None) -> dict:
    """Builds one row's workload, times and checks every peer; returns the row."""
    w = case.build()
    row = {"group": case.group, "op": case.op, "variant": case.variant, "shape": list(case.shape),
           "shape_str": case.shape_str, "size": case.size, "dtype": case.dtype_name, "numel": case.numel,
           "bytes": w.nbytes, "device": device.type, "notes": list(w.notes)}
    # Rows that move more than the cache (GPU L2, CPU LLC) are timed from a cold cache, every sample.
    flush = flusher is not None and w.nbytes is not None and w.nbytes >= flusher.cache_bytes
    row["l2_flushed"] = flush  # the name is historical: on CPU the last-level cache
    row["cache_flushed"] = flusher.name if flush else None
    # On CPU every row, on CUDA the end-to-end rows (event timing with L2 flushes serves the others).
    in_turn = row["in_turn"] = w.in_turn or device.type == "cpu"
    wrap = w.around or (lambda f: f)
    b = w.budget or budget
    timings, errs, first_s, in_turn_fns = {}, {}, {}, {}

    def run(name, fn):
        """Calls one peer and checks its output; times it now, or later in turn with the others."""
        f = wrap(fn)
        if w.reset is not None:
            w.reset()
        if in_turn:  # timed below, in turn with the other peers
            first_s[name], out = timing.first_call(f, w.args, device)
        else:
            t, out = timing.time_call(f, w.args, device, b, flusher, flush)
        errs[name] = _err(out, ref)  # a peer whose output cannot be checked is not timed either
        if in_turn:
            in_turn_fns[name] = f
        else:
            timings[name] = t

    def optional(name, fn, what):
        try:
            run(name, fn)
        except Exception as exc:  # an optional peer's failure is reported, not fatal
            row["notes"].append(f"{what} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")

    with torch.set_grad_enabled(w.grad):
        ref = w.oracle() if w.oracle is not None else None
        run("eager", w.eager)
        if not args.no_compile and w.compile_peer:
            optional("compile", compiled.get(w.compiled or w.eager), "torch.compile")
        run("fused", w.fused)
        if not args.no_extra_peers:
            for name, fn in w.peers.items():
                optional(name, fn, f"peer {name}")
        if in_turn:  # the flush goes before every peer's sample, as time_call does for one peer
            timings = timing.time_in_turn(in_turn_fns, w.args, device, b, first_s, w.prepare,
                                          flusher=flusher if flush else None)
    del ref

    row.update(_timing_fields("eager", timings["eager"]))
    row["eager_rel_err"] = errs["eager"]
    row["compile_ms"] = row["compile_rel_err"] = row["compile_first_call_s"] = None
    if "compile" in timings:
        row.update(_timing_fields("compile", timings["compile"]))
        row["compile_first_call_s"] = timings["compile"].first_call_s
        row["compile_rel_err"] = errs["compile"]
    t_fused = timings["fused"]
    row.update(_timing_fields("fused", t_fused))
    row["max_rel_err"] = errs["fused"]
    row["peers"] = {name: {"ms": t.median_ms, "min_ms": t.min_ms, "max_ms": t.max_ms, "rel_err": errs[name],
                           "first_call_s": t.first_call_s, "speedup_of_fused": t.median_ms / t_fused.median_ms}
                    for name, t in timings.items() if name not in ("eager", "compile", "fused")}

    row["speedup_vs_eager"] = row["eager_ms"] / row["fused_ms"]
    row["speedup_vs_compile"] = row["compile_ms"] / row["fused_ms"] if row["compile_ms"] is not None else None
    # Ratios of the fastest samples: noise from other work only adds time, so these are the
    # steadier estimate on a shared machine (the table shows the medians).
    row["speedup_vs_eager_best"] = row["eager_min_ms"] / row["fused_min_ms"]
    row["speedup_vs_compile_best"] = (row["compile_min_ms"] / row["fused_min_ms"]
                                      if row["compile_ms"] is not None else None)
    row["gbps"] = w.nbytes / (row["fused_ms"] * 1e-3) / 1e9 if w.nbytes else None
    # % copy against a copy of the row's own size and flush decision (only rows with a GB/s need one).
    row["copy_gbps"] = copies.for_row(case, flush)["gbps"] if row["gbps"] and copies is not None else None
    row["pct_copy"] = 100 * row["gbps"] / row["copy_gbps"] if row["copy_gbps"] else None
    if row["max_rel_err"] is None:
        row["tolerance"] = row["accuracy_ok"] = None
    else:
        row["tolerance"] = accuracy.bound(case.dtype, row["eager_rel_err"], w.tolerance)
        row["accuracy_ok"] = row["max_rel_err"] <= row["tolerance"]
    return row


def _unmatched_ops(ops, cases: list[Case], skipped: dict) -> str | None:
    """Why some of ``--ops`` cannot run (a skipped group, or a name no row has), or None.

    Asked for by name, a group that was skipped (or an op of one: its op names are unknown
    without its module) must not end in a run that exits 0 without it.
    """
    missing = [o for o in ops or () if not any(c.op == o or c.group == o for c in cases)]
    if not missing:
        return None
    why = [f"--ops {o}: group skipped ({skipped[o]})" if o in skipped else f"--ops {o}: no such op or group"
           for o in missing]
    if skipped and any(o not in skipped for o in missing):
        why.append(f"(skipped groups, whose ops are unknown: {', '.join(sorted(skipped))})")
    return "; ".join(why)


def _write_markdown(path: str, result: dict, chart_name: str | None) -> None:
    with open(path, "w") as f:
        f.write(report.markdown(result, chart_name))


def _draw_chart(rows: list[dict], path: str, title: str) -> str | None:
    """Draws the speedup chart; returns None when drawn, else the reason it was not (never raises)."""
    try:
        return report.chart(rows, path, title)
    except Exception as exc:  # a chart is a convenience: its failure is reported, the results are kept
        return f"drawing it failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def _chart_title(result: dict) -> str:
    return f"ucgm_fast fused speedups: {result['environment']['device_name']} ({result['mode']})"


def _redraw(paths: list[str]) -> int:
    """Draws each results JSON's chart beside it and relinks its .md; 1 if one could not be drawn.

    For results measured elsewhere: a GPU lease returns few files, so scripts/gpu_check.sh leaves
    the charts behind there and they are drawn here from the JSON.
    """
    status = 0
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        stem = path[:-len(".json")] if path.endswith(".json") else path
        why = _draw_chart(result["rows"], stem + ".png", _chart_title(result))
        if why is None:
            _write_markdown(stem + ".md", result, os.path.basename(stem + ".png"))
            _progress(f"drew {stem}.png")
        else:
            _progress(f"{path}: no chart: {why}")
            status = 1
    return status


def _fmt_progress(row: dict) -> str:
    ms = lambda k: "-" if row.get(k) is None else f"{row[k]:.4g}"
    s = f"eager {ms('eager_ms')} | compile {ms('compile_ms')} | fused {ms('fused_ms')} ms"
    s += f" | {row['speedup_vs_eager']:.2f}x eager"
    if row.get("speedup_vs_compile") is not None:
        s += f", {row['speedup_vs_compile']:.2f}x compile"
    if row.get("max_rel_err") is not None:
        s += f" | err {row['max_rel_err']:.1e}" + ("" if row["accuracy_ok"] else " FAIL")
    s += "".join(f" | {name} {p['ms']:.4g} ms" for name, p in row.get("peers", {}).items())
    return s + "".join(f" | {n}" for n in row["notes"])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.redraw:
        return _redraw(args.redraw)
    started = time.perf_counter()
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        _progress("run.py: --device cuda but torch sees no CUDA device (torch "
                  f"{torch.__version__}, built with CUDA {torch.version.cuda})")
        return 2
    device = torch.device(args.device)
    smallest = args.sizes == "smallest"
    plan = Plan(device=device, quick=args.quick, smallest=smallest, seed=args.seed, compile=not args.no_compile)
    mode = "smallest" if smallest else "quick" if args.quick else "full"

    groups, skipped = discover("cases")
    for group, why in skipped.items():
        _progress(f"skipping benchmark group '{group}' (a package it needs is not installed): {why}")
    cases = collect(groups, plan, args.ops)
    unmatched = _unmatched_ops(args.ops, cases, skipped)
    if unmatched:
        _progress(f"run.py: {unmatched}")
        return 2
    if args.match:
        pattern = re.compile(args.match)
        cases = [c for c in cases if pattern.search(c.key)]
    if not cases:
        _progress(f"run.py: no rows selected (groups: {sorted(groups)}, --ops {args.ops}, --match {args.match})")
        return 2
    if args.list:
        print("\n".join(c.key for c in cases))
        return 0

    _configure_compile()
    budget = timing.SMOKE if smallest else {
        ("cpu", False): timing.FULL, ("cpu", True): timing.QUICK,
        ("cuda", False): timing.FULL_CUDA, ("cuda", True): timing.QUICK_CUDA}[(device.type, args.quick)]
    flusher = timing.flusher_for(device)
    malloc = "unchanged (--keep-malloc)" if args.keep_malloc else steady_malloc()
    env = environment(device, os.path.dirname(HERE))
    env["malloc"] = malloc
    _progress(f"ucgm_fast benchmark on {env['device_name']}: {len(cases)} rows ({mode}), "
              f"torch {env['torch']}, {env['torch_threads']} threads")

    # The headline copy runs at the largest row's size; each row's % copy uses a copy of its own
    # size and flush decision (CopyBandwidth), measured when the first row of that size needs it.
    copies = CopyBandwidth(device, budget, flusher)
    copy_numel = max([c.numel for c in cases] + [1 << (16 if smallest else 20)])
    copy = copies(copy_numel, 2 * 4 * copy_numel >= flusher.cache_bytes)
    _progress(f"copy bandwidth: {copy['gbps']:.1f} GB/s at {copy_numel} float32 elements"
              + (f" ({flusher.name} flushed)" if copy["l2_flushed"] else ""))

    name = args.name or device.type
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, name)

    def save(rows, errors, interrupted, final):
        """Writes <stem>.json and .md, then (when final) the chart; returns (result, why no chart or None).

        The results are written first: a chart that fails to draw must not lose them. The .md is
        rewritten with the chart's link once the chart exists.
        """
        result = {"mode": mode, "environment": env, "copy_bandwidth": copy,
                  "copy_bandwidth_per_size": [dict(c) for c in copies.measured.values()],
                  "skipped_groups": skipped, "errors": errors, "interrupted": interrupted, "rows": rows,
                  "wall_s": time.perf_counter() - started,
                  "load_average_1m_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
        report.write_json(stem + ".json", result)
        _write_markdown(stem + ".md", result, None)
        if not final:
            return result, "not drawn before the run ends"
        no_chart = _draw_chart(rows, stem + ".png", _chart_title(result))
        if no_chart is None:
            _write_markdown(stem + ".md", result, os.path.basename(stem + ".png"))
        return result, no_chart

    compiled = CompileCache()
    rows, errors, interrupted = [], [], None
    # Ctrl-C or SIGTERM (e.g. from `timeout`) stops the run but still writes the rows measured so far;
    # the files are also rewritten after every row, so even a killed run leaves what it measured.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        for i, case in enumerate(cases, 1):
            _progress(f"[{i}/{len(cases)}] {case.key} ... ", end="")
            try:
                row = run_case(case, args, device, budget, flusher, compiled, copies)
            except Exception as exc:  # one broken row must not lose the others: reported, exit status 1
                errors.append(f"{case.key}: {type(exc).__name__}: {exc}")
                _progress(f"ERROR {type(exc).__name__}: {exc}")
                traceback.print_exc(file=sys.stderr)
                continue
            rows.append(row)
            _progress(f"{_fmt_progress(row)}  ({time.perf_counter() - started:.0f} s)")
            if i < len(cases):
                save(rows, errors, f"stopped after {i} of {len(cases)} rows (the run did not finish)", final=False)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the next row's large tensors need not fit beside this row's
    except KeyboardInterrupt:
        interrupted = f"interrupted after {len(rows) + len(errors)} of {len(cases)} rows"
        _progress(f"\n{interrupted}: writing the rows measured so far")

    result, no_chart = save(rows, errors, interrupted, final=True)
    print("\n".join(report.summary_lines(result)))
    print()
    print(report.text_table(rows))
    if args.json:
        report.write_json(args.json, rows)
    _progress(f"wrote {stem}.json, {stem}.md" + (f", {stem}.png" if no_chart is None else "")
              + (f", {args.json}" if args.json else ""))
    if no_chart is not None:
        _progress(f"no speedup chart: {no_chart}")

    if errors:
        _progress(f"{len(errors)} rows failed to run:\n  " + "\n  ".join(errors))
    failed = [r for r in rows if r.get("accuracy_ok") is False]
    if failed:
        _progress("accuracy FAIL (max_rel_err over bound): " + ", ".join(
            f"{r['op']}/{r['variant']}/{r['shape_str']}/{r['dtype']} {r['max_rel_err']:.2e} > {r['tolerance']:.2e}"
            for r in failed))
    if interrupted:
        _progress(f"run.py: {interrupted}")
        return 130
    return 1 if errors or failed else 0


if __name__ == "__main__":
    sys.exit(main())
