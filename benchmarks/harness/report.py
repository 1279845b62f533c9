"""The report: a text table for the terminal, Markdown and JSON result files, and a speedup chart."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

COLUMNS = [  # (header, row key, format)
    ("op", "op", "s"), ("variant", "variant", "s"), ("shape", "shape_str", "s"), ("dtype", "dtype", "s"),
    ("eager ms", "eager_ms", "ms"), ("compile ms", "compile_ms", "ms"), ("fused ms", "fused_ms", "ms"),
    ("vs eager", "speedup_vs_eager", "x"), ("vs compile", "speedup_vs_compile", "x"),
    ("GB/s", "gbps", "gbps"), ("% copy", "pct_copy", "pct"), ("max rel err", "max_rel_err", "err"),
]


def _fmt(value, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "s":
        return str(value)
    if kind == "ms":
        return f"{value:.4g}"
    if kind == "x":
        return f"{value:.2f}x"
    if kind == "gbps":
        return f"{value:.1f}"
    if kind == "pct":
        return f"{value:.0f}%"
    if kind == "err":
        return "inf" if value == float("inf") else f"{value:.1e}"
    raise ValueError(kind)


def _peer_names(rows: list[dict]) -> list[str]:
    names = []
    for row in rows:
        for name in row.get("peers", {}):
            if name not in names:
                names.append(name)
    return names


def _cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    extra = _peer_names(rows)
    header = [h for h, _, _ in COLUMNS] + [f"{p} ms" for p in extra]
    body = []
    for row in rows:
        cells = [_fmt(row.get(key), kind) for _, key, kind in COLUMNS]
        if row.get("accuracy_ok") is False:
            cells[len(COLUMNS) - 1] += " FAIL"
        cells += [_fmt(row.get("peers", {}).get(p, {}).get("ms"), "ms") for p in extra]
        body.append(cells)
    return header, body


def text_table(rows: list[dict]) -> str:
    """The table as aligned plain text (stdout)."""
    header, body = _cells(rows)
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    left = {0, 1, 2, 3}
    line = lambda cells: "  ".join(c.ljust(w) if i in left else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in body]
    return "\n".join(out)


def markdown_table(rows: list[dict]) -> str:
    header, body = _cells(rows)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 4 else "---:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(out)


def _count(n: int) -> str:
    return f"{n / 2**20:g}M" if n >= 2**20 and n % 2**18 == 0 else str(n)


def _load_warning(result: dict) -> str:
    env = result["environment"]
    loads = [v for v in (env.get("load_average_1m"), result.get("load_average_1m_end")) if v is not None]
    if loads and env.get("cpus_usable") and max(loads) > env["cpus_usable"]:
        return " (over the CPU count: other work shared the machine, so times are inflated)"
    return ""


def summary_lines(result: dict) -> list[str]:
    """Headline lines: device, versions, copy bandwidth, what was skipped."""
    env, copy = result["environment"], result.get("copy_bandwidth")
    build = env.get("build_info", {})
    lines = [
        f"device: {env['device_name']} ({env['device']})",
        f"torch {env['torch']}" + (f", CUDA {env['torch_cuda']}" if env.get("torch_cuda") else "")
        + (f", driver {env['cuda_driver']}" if env.get("cuda_driver") else "")
        + f", python {env['python']}, ucgm_fast {env.get('ucgm_fast')} ({env.get('git_commit') or 'no git'})",
        f"threads: torch {env['torch_threads']}, usable CPUs {env['cpus_usable']}, "
        f"OMP_NUM_THREADS={env.get('omp_num_threads')}, load average {env.get('load_average_1m')} at start, "
        f"{result.get('load_average_1m_end')} at end" + _load_warning(result),
        f"ucgm_fast build: OpenMP {build.get('openmp')}, CPU kernels {build.get('cpu_isa')} "
        f"(of {', '.join(build.get('cpu_isas', []))}), CUDA {build.get('cuda')} "
        f"({build.get('cuda_version')}, archs {build.get('cuda_architectures')})",
    ]
    if env.get("malloc"):
        lines.append(f"malloc: {env['malloc']}")
    if copy:
        lines.append(f"copy bandwidth (same run): {copy['gbps']:.1f} GB/s  "
                     f"({_count(copy['numel'])} float32, read+write, {copy['ms']:.4g} ms"
                     + (", cache flushed" if copy.get("l2_flushed") else "") + "); each row's % copy is "
                     "against a copy of its own size")
    for group, why in result.get("skipped_groups", {}).items():
        lines.append(f"skipped group {group}: {why}")
    if result.get("interrupted"):
        lines.append(f"INCOMPLETE: {result['interrupted']}")
    for error in result.get("errors", []):
        lines.append(f"ERROR (row not reported): {error}")
    lines.append(f"{result['mode']} run, {len(result['rows'])} rows in {result['wall_s']:.0f} s; "
                 f"{env['date_utc']} UTC")
    return lines


METHOD = """\
Method: each peer is called once (its wall time, which includes torch.compile's compilation, is
`compile_first_call_s` in the JSON), warmed up, then timed as the median (min/max in the JSON, and
`speedup_*_best` from the fastest samples, steadier on a shared machine) of
repeated samples: `time.perf_counter` around back-to-back calls on CPU, CUDA events on CUDA. Rows
that move more than the GPU's L2 (on CPU, the last-level cache) take one call per sample, each
after a read of twice that cache (`l2_flushed` in the JSON). CPU rows and end-to-end rows take one
sample of each peer in turn (wall clock, device synchronized), so drift over the row (other work
on the machine, clocks) falls on every peer alike. Inputs are random normal data (never
zeros) with per-sample times in [0.02, 0.98]. *eager* is `ucgm_fast.reference` (the published
formulas in PyTorch), *compile* is `torch.compile` of that same function, *fused* is ucgm_fast's op.
GB/s counts the fewest bytes one fused call must move (inputs read once, outputs written once);
% copy compares it with a device copy measured in the same run with tensors of the row's size
and the row's cache-flush decision (`copy_gbps` in the JSON). Rows may carry notes (listed
under the table) on how to read them: what their oracle is, bytes a peer does not move. max rel
err is max|fused - ref| / max|ref| against the reference evaluated in float64 on the same inputs
(or as the row's note says); every row is checked (FAIL marks a row over the bound of
tests/conftest.py, or over 2x the eager reference's own error in the same dtype where that is
larger, up to 100x the bound: an eager error beyond that means the oracle is wrong, and the row
fails).
"""


def note_lines(rows: list[dict]) -> list[str]:
    """Each distinct row note once, with the rows it applies to (notes say how to read a row)."""
    where: dict = {}
    for r in rows:
        for note in r.get("notes", []):
            where.setdefault(note, []).append(f"{r['op']}/{r['variant']}/{r['shape_str']}/{r['dtype']}")
    return [f"{note} ({', '.join(keys)})" for note, keys in where.items()]


def markdown(result: dict, chart_name: Optional[str]) -> str:
    env = result["environment"]
    out = [f"# ucgm_fast benchmark: {env['device_name']}", ""]
    out += [f"- {line}" for line in summary_lines(result)]
    out += ["", markdown_table(result["rows"]), ""]
    notes = note_lines(result["rows"])
    if notes:
        out += ["Notes:", ""] + [f"- {line}" for line in notes] + [""]
    if chart_name:
        out += [f"![speedups]({chart_name})", ""]
    out += [METHOD]
    return "\n".join(out)


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float written as a string ("inf", "-inf", "nan").

    JSON has no Infinity or NaN (``json.dump`` writes them by default, and strict parsers reject
    the file). Strings, not null: null already means "not measured / not checked" (a row's
    max_rel_err is inf when an output has a NaN, which must still read as a failure), and Python's
    ``float()`` reads them back.
    """
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def write_json(path: str, obj) -> None:
    """Writes ``obj`` as strict JSON (non-finite floats as strings, see :func:`finite_json`)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = json.dumps(finite_json(obj), indent=1, default=str, allow_nan=False)
    with open(path, "w") as f:
        f.write(text + "\n")


def chart(rows: list[dict], path: str, title: str) -> Optional[str]:
    """Horizontal bars: fused speedup over eager and over torch.compile per row (log scale).

    Returns None when the chart was drawn, else why not (no matplotlib, no rows); errors while
    drawing propagate.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as exc:
        return f"it needs matplotlib (pip install matplotlib): {exc}"
    rows = [r for r in rows if r.get("speedup_vs_eager") is not None]
    if not rows:
        return "no rows to chart"
    labels = [f"{r['op']} {r['variant']} {r['shape_str']} {r['dtype']}".replace("  ", " ") for r in rows]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.28 * len(rows)))
    try:  # closed whatever happens: pyplot keeps every open figure alive
        y = list(range(len(rows)))[::-1]
        h = 0.4
        ax.barh([v + h / 2 for v in y], [r["speedup_vs_eager"] for r in rows], h, label="vs eager reference",
                color="#4477aa")
        comp = [(v, r["speedup_vs_compile"]) for v, r in zip(y, rows) if r.get("speedup_vs_compile") is not None]
        if comp:
            ax.barh([v - h / 2 for v, _ in comp], [s for _, s in comp], h, label="vs torch.compile",
                    color="#ee6677")
        for v, r in zip(y, rows):
            ax.text(r["speedup_vs_eager"], v + h / 2, f" {r['speedup_vs_eager']:.3g}x", va="center", fontsize=6)
        for v, s in comp:
            ax.text(s, v - h / 2, f" {s:.3g}x", va="center", fontsize=6)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}x"))
        ax.set_xlim(right=ax.get_xlim()[1] * 1.6)  # room for the value labels
        ax.set_yticks(y)
        ax.set_yticklabels(labels, fontsize=7)
        ax.set_xlabel("fused speedup (x, log scale; > 1 is faster)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(axis="x", which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return None
