"""benchmarks/run.py keeps working: every case at the smallest size, every row checked.

These tests check the harness runs and reports correctly, not speed (timings are for the
benchmark itself to report, never asserted).
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import run  # noqa: E402  (benchmarks/run.py)
from harness import accuracy, env, report, timing  # noqa: E402
from harness.case import Plan, discover  # noqa: E402
from conftest import DEVICES  # noqa: E402

REQUIRED = ["op", "shape", "dtype", "eager_ms", "compile_ms", "fused_ms", "speedup_vs_eager", "speedup_vs_compile",
            "max_rel_err"]


def _run(tmp_path, *extra, device="cpu"):
    rows_path = tmp_path / "rows.json"
    status = run.main(["--device", device, "--sizes", "smallest", "--out-dir", str(tmp_path), "--name", "bench",
                       "--json", str(rows_path), *extra])
    return status, json.loads(rows_path.read_text()), json.loads((tmp_path / "bench.json").read_text())


@pytest.mark.parametrize("device", DEVICES)
def test_smallest_every_case_runs_and_is_checked(tmp_path, capsys, device):
    status, rows, result = _run(tmp_path, "--no-compile", device=device)
    assert status == 0
    assert {r["op"] for r in rows} >= {"coefficients", "interpolate", "decode"}
    import ucgm_fast
    assert {r["variant"] for r in rows if r["op"] == "decode"} == set(ucgm_fast.TRANSPORTS)
    for r in rows:
        for key in REQUIRED:
            assert key in r, key
        assert r["compile_ms"] is None and r["speedup_vs_compile"] is None
        assert r["eager_ms"] > 0 and r["fused_ms"] > 0
        assert r["eager_min_ms"] <= r["eager_ms"] <= r["eager_max_ms"]
        assert r["speedup_vs_eager"] == pytest.approx(r["eager_ms"] / r["fused_ms"])
        assert r["max_rel_err"] is not None and r["accuracy_ok"], r
        if r["group"] == "transport":
            assert r["max_rel_err"] <= 2e-6, r
        assert r["device"] == device
        # op rows move a known number of bytes; a training step, a sampling run or the whole objective does not
        assert (r["gbps"] is None) == (r["group"] == "end_to_end" or r["op"] == "objective"), r
        assert r["gbps"] is None or r["gbps"] > 0
        # % copy is against a copy of the row's own size, measured in the same run
        assert (r["copy_gbps"] is None) == (r["gbps"] is None), r
        if r["gbps"] is not None:
            assert r["copy_gbps"] > 0 and r["pct_copy"] == pytest.approx(100 * r["gbps"] / r["copy_gbps"])
        aliased = r["op"] == "coefficients" and r["variant"] in ("Linear", "ReLinear")
        assert aliased == any("return t itself" in n for n in r["notes"]), r
        if r["op"] == "sample":
            assert any(n.startswith("oracle: ") for n in r["notes"]), r
        if r["group"] == "end_to_end":
            assert any("bf16 autocast" in n for n in r["notes"]) == (device == "cuda"), r
    assert {r["variant"] for r in rows if r["op"] == "objective"} == {"Linear,lambda=0", "Linear,lambda=1,enhanced"}
    e2e = {r["op"] + "/" + r["variant"].split(",")[1] for r in rows if r["group"] == "end_to_end"}
    assert all(r["in_turn"] == (device == "cpu" or r["group"] == "end_to_end") for r in rows)
    assert e2e == {"train_step/lambda=0", "train_step/lambda=1", "sample/steps=2", "sample/steps=30"}
    assert result["copy_bandwidth"]["gbps"] > 0
    # one copy per distinct (size, flush) of the rows, none for the same size twice
    sizes = [(c["numel"], c["l2_flushed"]) for c in result["copy_bandwidth_per_size"]]
    assert len(sizes) == len(set(sizes)) >= 2
    env_ = result["environment"]
    assert env_["torch"] == torch.__version__ and env_["torch_threads"] >= 1 and env_["device_name"]
    out = capsys.readouterr().out
    assert "fused ms" in out and "copy bandwidth" in out and "decode" in out
    md = (tmp_path / "bench.md").read_text()
    assert "| op |" in md and "Notes:" in md and "return t itself" in md
    try:
        import matplotlib  # noqa: F401  (optional: the chart is skipped without it)
    except ImportError:
        assert not (tmp_path / "bench.png").exists() and "bench.png" not in md
    else:
        assert "bench.png" in md
        assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compile_peer_on_one_row(tmp_path):
    # decode (a map) and ucgm_loss (forward then backward: AOTAutograd compiles the backward too)
    status, rows, _ = _run(tmp_path, "--match", "^(decode/EDM|ucgm_loss/huber=5,cosine,tw)/")
    assert status == 0 and {r["op"] for r in rows} == {"decode", "ucgm_loss"} and len(rows) == 2
    for r in rows:
        assert r["compile_ms"] > 0 and r["compile_first_call_s"] > 0
        assert r["speedup_vs_compile"] == pytest.approx(r["compile_ms"] / r["fused_ms"])
        assert r["compile_rel_err"] <= 1e-5 and r["max_rel_err"] <= 2e-6 and r["accuracy_ok"], r


def test_numba_peer_is_timed_and_checked(tmp_path):
    pytest.importorskip("numba")
    status, rows, _ = _run(tmp_path, "--no-compile", "--match", "^sampler_step/Linear,order=1(,stochastic)?/")
    assert status == 0 and len(rows) == 2
    for r in rows:
        peer = r["peers"]["numba"]  # the same step (noise handed in) on the CPU, one prange loop
        assert peer["ms"] > 0 and peer["first_call_s"] > 0
        assert peer["rel_err"] <= 1e-6, r
        assert peer["speedup_of_fused"] == pytest.approx(peer["ms"] / r["fused_ms"])


def test_no_rows_selected_is_an_error(tmp_path):
    assert run.main(["--device", "cpu", "--sizes", "smallest", "--match", "no-such-op",
                     "--out-dir", str(tmp_path)]) == 2


def test_script_entry_point_lists_quick_rows():
    out = subprocess.run([sys.executable, os.path.join(BENCH, "run.py"), "--device", "cpu", "--quick", "--list"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    keys = out.stdout.split()
    # The CPU speed target is stated at 4M float32 elements: the quick set must hold those rows.
    for op in ("coefficients", "interpolate", "decode"):
        assert any(k.startswith(f"{op}/Linear/") and k.endswith("/float32") and
                   ("4194304" in k or "256x4x64x64" in k) for k in keys), op


def _fake_cases(tmp_path, monkeypatch, name, **modules):
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for module, text in modules.items():
        (pkg / f"{module}.py").write_text(text + "\ndef cases(plan):\n    return []\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_group_needing_a_missing_package_is_skipped_with_reason(tmp_path, monkeypatch):
    _fake_cases(tmp_path, monkeypatch, "fake_cases", needs_pkg="import no_such_third_party_pkg_ucgm",
                present="")
    groups, skipped = discover("fake_cases")
    assert list(groups) == ["present"]
    assert "no_such_third_party_pkg_ucgm" in skipped["needs_pkg"]


@pytest.mark.parametrize("line", ["from ucgm_fast import no_such_op_yet", "import ucgm_fast.no_such_module",
                                  "from harness.no_such_module import x", "from harness.case import no_such_name"])
def test_missing_op_or_harness_module_is_an_error(tmp_path, monkeypatch, line):
    # Every group's ops exist: a missing one (a rename, a broken build) must not drop the group
    # silently while the run exits 0.
    _fake_cases(tmp_path, monkeypatch, "fake_cases_own", broken=line, present="")
    with pytest.raises(ImportError):
        discover("fake_cases_own")


def test_ops_naming_a_skipped_group_exits_non_zero(tmp_path, monkeypatch, capsys):
    real_discover = run.discover

    def discover_with_skipped(package):
        groups, skipped = real_discover(package)
        return groups, {**skipped, "extra": "needs cupy: ModuleNotFoundError: No module named 'cupy'"}

    monkeypatch.setattr(run, "discover", discover_with_skipped)
    argv = ["--device", "cpu", "--sizes", "smallest", "--no-compile", "--out-dir", str(tmp_path)]
    assert run.main(argv + ["--ops", "decode", "extra"]) == 2
    assert "extra" in capsys.readouterr().err and not (tmp_path / "cpu.json").exists()
    assert run.main(argv + ["--ops", "decode", "no_such_op"]) == 2  # an op of a skipped group, or a typo


def test_max_rel_err_and_bounds():
    ref = (torch.tensor([1.0, -2.0]), torch.tensor([4.0]))
    assert accuracy.max_rel_err(ref, ref) == 0
    assert accuracy.max_rel_err((torch.tensor([1.0, -2.5]), torch.tensor([4.0])), ref) == pytest.approx(0.25)
    assert accuracy.max_rel_err((torch.tensor([1.0, float("nan")]), ref[1]), ref) == float("inf")
    # a broken reference fails the row instead of passing it (max() with a NaN keeps the other value)
    for bad in (float("nan"), float("inf")):
        assert accuracy.max_rel_err((torch.tensor([1.0, 9.0]), ref[1]), (torch.tensor([1.0, bad]), ref[1])) == \
            float("inf")
    assert accuracy.bound(torch.float32, float("inf")) == accuracy.TOLERANCE[torch.float32]  # NaN eager output
    with pytest.raises(ValueError):
        accuracy.max_rel_err(ref[0], ref)
    assert accuracy.bound(torch.bfloat16, 0.02) == pytest.approx(0.04)
    assert accuracy.bound(torch.float32, 1e-8) == accuracy.TOLERANCE[torch.float32]
    assert accuracy.bound(torch.float32, 1e-5) == pytest.approx(2e-5)  # ill-conditioned: 2x eager's own error
    assert accuracy.bound(torch.float32, 1e-5, override=1e-3) == 1e-3
    assert accuracy.bound(torch.float32, 0.05, override=2e-2) == pytest.approx(0.1)  # bf16 model: eager's error
    # an eager peer far off the float64 oracle means the oracle is broken: the bound widens no further
    assert accuracy.bound(torch.float64, 0.2) == pytest.approx(accuracy.WIDEN_CAP * 1e-12)
    assert accuracy.bound(torch.float32, 0.2, override=2e-2) == pytest.approx(0.4)


def test_results_are_written_when_the_chart_fails(tmp_path, monkeypatch, capsys):
    def broken_chart(rows, path, title):
        raise RuntimeError("no display backend today")

    monkeypatch.setattr(report, "chart", broken_chart)
    status, rows, result = _run(tmp_path, "--no-compile", "--match", "^decode/EDM/")
    assert status == 0 and len(rows) == 1 and len(result["rows"]) == 1
    assert "bench.png" not in (tmp_path / "bench.md").read_text()
    assert "RuntimeError: no display backend today" in capsys.readouterr().err


def test_chart_reports_why_it_was_not_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    assert report.chart([], str(tmp_path / "c.png"), "t") == "no rows to chart"  # not "needs matplotlib"


def test_json_has_no_infinity_or_nan(tmp_path):
    path = tmp_path / "r.json"
    report.write_json(str(path), {"rows": [{"max_rel_err": float("inf"), "x": float("nan"), "y": [-float("inf"), 1.5]}],
                                  "dtype": torch.float32})

    def strict(name):
        raise ValueError(f"non-JSON constant {name}")

    obj = json.loads(path.read_text(), parse_constant=strict)
    assert obj == {"rows": [{"max_rel_err": "inf", "x": "nan", "y": ["-inf", 1.5]}], "dtype": "torch.float32"}
    assert float(obj["rows"][0]["max_rel_err"]) == float("inf")


def test_copy_bandwidth_is_measured_once_per_row_size(monkeypatch):
    from harness.case import Case

    calls = []

    def fake_copy(numel, device, budget, flusher=None, flush=None):
        calls.append((numel, flush))
        return {"numel": numel, "gbps": float(numel), "l2_flushed": flush}

    monkeypatch.setattr(timing, "copy_bandwidth", fake_copy)
    copies = run.CopyBandwidth(torch.device("cpu"), timing.SMOKE, timing.CPUFlusher(1 << 20))
    row = lambda shape, dtype: Case("g", "op", "", shape, dtype, "train", None)
    assert copies.for_row(row((4, 8), torch.float32), False)["numel"] == 32
    assert copies.for_row(row((8, 4), torch.float32), False)["numel"] == 32  # same size: measured once
    assert copies.for_row(row((4, 8), torch.float32), True)["numel"] == 32   # flushed: another copy
    assert copies.for_row(row((4, 8), torch.float64), False)["numel"] == 64  # tensors of as many bytes
    assert copies.for_row(row((4, 8), torch.bfloat16), False)["numel"] == 16
    assert calls == [(32, False), (32, True), (64, False), (16, False)]


def test_cpu_flusher_is_twice_the_last_level_cache():
    assert timing._parse_cache_size("32768K") == 32 * 2**20 and timing._parse_cache_size("1M") == 2**20
    assert timing._parse_cache_size("512") == 512 and timing._parse_cache_size("n/a") == 0
    assert timing.llc_bytes() >= 2**20
    f = timing.CPUFlusher()
    assert f.cache_bytes == timing.llc_bytes() and f.buffer.numel() * 4 > 2 * f.cache_bytes
    assert isinstance(timing.flusher_for(torch.device("cpu")), timing.CPUFlusher)


def test_in_turn_flush_runs_before_every_sample_of_every_peer():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    budget = timing.Budget(warmup_s=0.0, sample_s=1.0, total_s=0.0, min_repeats=2, max_repeats=2)
    t = timing.time_in_turn(fns, (), torch.device("cpu"), budget, {"a": 0.0, "b": 0.0},
                            prepare={"b": lambda: calls.append("prepare b")}, flusher=lambda: calls.append("flush"))
    # warm-up, then two rounds: one call per sample (a flushed sample times one call), after the flush
    assert calls == ["a", "b"] + ["flush", "a", "prepare b", "flush", "b"] * 2
    assert all(tn.inner == 1 and tn.l2_flushed for tn in t.values())
    t, _ = timing.time_call(lambda: calls.append("c"), (), torch.device("cpu"), budget, lambda: calls.append("f"),
                            flush=True)
    assert calls[-6:] == ["c", "c", "f", "c", "f", "c"] and t.l2_flushed  # first call, warm-up, 2 samples


def test_cpu_timing_reports_median_between_min_and_max():
    x = torch.rand(1000) + 0.5
    t, out = timing.time_call(torch.sqrt, (x,), torch.device("cpu"), timing.QUICK)
    assert torch.allclose(out, x.sqrt())
    assert 0 < t.min_ms <= t.median_ms <= t.max_ms and t.repeats >= timing.QUICK.min_repeats and t.inner >= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extrapolating_step_row_detects_a_wrong_ratio(dtype):
    # The row's buffers start at another step's estimates, so the extrapolation term is not zero
    # in the checked call; a step with the wrong ratio must fail it.
    from harness.case import Plan
    from cases import sampler as cases

    w = cases._workload(Plan(torch.device("cpu"), smallest=True), "order=1,extrapolate", "Linear", (3, 2, 5), dtype)
    ref = w.oracle()
    for e, ok in ((cases.EXTRAPOLATION, True), (0.0, False), (10 * cases.EXTRAPOLATION, False)):
        for _ in range(2):  # the step overwrites its buffers: reset makes every checked call start alike
            w.reset()
            args = list(w.args)
            args[7] = e
            err = accuracy.max_rel_err(w.fused(*args), ref)
            assert (err <= accuracy.TOLERANCE[dtype]) == ok, (e, err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extrapolating_step_row_checks_the_buffers(dtype):
    # The step also writes x_prev and z_prev (counted in the row's bytes): a fused step that gets
    # x_next right but leaves wrong buffers must fail the row. In float64 the oracle's buffers
    # must be its own: it ran first and once wrote its estimates into the ones reset restores.
    from cases import sampler as cases

    w = cases._workload(Plan(torch.device("cpu"), smallest=True), "order=1,extrapolate", "Linear", (3, 2, 5), dtype)
    ref = w.oracle()
    assert len(ref) == 3 and all(r.dtype == torch.float64 for r in ref)
    x_prev, z_prev = w.args[8], w.args[9]

    def scribbles(*args):
        out = w.fused(*args)
        z_prev.mul_(1.01)
        return out

    def skips_buffers(*args):
        saved = x_prev.clone(), z_prev.clone()
        out = w.fused(*args)
        x_prev.copy_(saved[0]), z_prev.copy_(saved[1])
        return out

    tol = accuracy.TOLERANCE[dtype]
    for fn, ok in ((w.fused, True), (w.eager, True), (scribbles, False), (skips_buffers, False)):
        w.reset()
        err = accuracy.max_rel_err(fn(*w.args), ref)
        assert (err <= tol) == ok, (fn, err)


def test_order2_row_checks_the_steps_x_hat():
    from cases import sampler as cases

    w = cases._workload(Plan(torch.device("cpu"), smallest=True), "order=2", "Linear", (3, 2, 5), torch.float32)
    ref = w.oracle()
    out = w.fused(*w.args)
    assert len(out) == len(ref) == 2
    assert accuracy.max_rel_err(out, ref) <= accuracy.TOLERANCE[torch.float32]
    assert accuracy.max_rel_err((out[0], out[1] * 1.01), ref) > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["lambda=0", "lambda=1,enhanced"])
def test_objective_rows_with_16bit_data_run_and_pass(variant, dtype):
    # The published-order peer once failed every 16-bit lambda=1 row (a float32 update into a
    # 16-bit index_put); --sizes smallest runs float32 only.
    from cases import objective as cases

    w = cases._objective_workload(Plan(torch.device("cpu"), smallest=True), variant, "Linear", (32, 4, 4, 4), dtype)
    ref = w.oracle()
    eager_err = accuracy.max_rel_err(w.around(w.eager)(*w.args), ref)
    fused_err = accuracy.max_rel_err(w.around(w.fused)(*w.args), ref)
    assert fused_err <= accuracy.bound(dtype, eager_err, w.tolerance), (fused_err, eager_err, w.tolerance)


def test_train_step_row_checks_the_gradient():
    from cases import end_to_end as e2e

    plan = Plan(torch.device("cpu"), smallest=True, compile=False)
    w = e2e._train_workload(plan, "DiT-S/2", (10, 4, 8, 8), "lambda=1,enhanced", False)
    ref = w.oracle()
    assert ref[0].dtype == ref[1].dtype == torch.float64 and ref[1].numel() == sum(
        p.numel() for p in w.fused.params)
    # the checked call (armed by reset) returns (loss, gradient); timed calls only the loss
    for step in (w.eager, w.fused):
        w.reset()
        loss, grad = step(*w.args)
        assert accuracy.max_rel_err((loss, grad), ref) <= w.tolerance
        assert isinstance(step(*w.args), torch.Tensor)

    def no_backward(x, y, t, z):  # a fused step that skips backward: the loss is right, the gradient 0
        fused = w.fused
        with e2e._autocast(x.device):
            loss = fused.ucgm.loss(fused.net, x, y, t=t, z=z)
        fused.grads.zero_()
        fused.grads.clip_(None, True)
        return loss.detach(), e2e.flat_grad(fused.params)

    def half_gradient(*args):
        loss, grad = w.fused(*args)
        return loss, grad * 0.999

    for bad in (no_backward, half_gradient):
        w.reset()
        out = bad(*w.args)
        assert accuracy.max_rel_err(out[0], ref[0]) <= w.tolerance  # the loss alone would pass
        assert accuracy.max_rel_err(out, ref) > w.tolerance, bad


def test_sample_oracle_is_a_float64_reference_not_the_eager_peer():
    from cases import end_to_end as e2e

    plan = Plan(torch.device("cpu"), smallest=True, compile=False)
    w = e2e._sample_workload(plan, "DiT-S/2", (2, 4, 8, 8), 2)
    ref = w.oracle()
    assert ref.dtype == torch.float64
    eager, fused = w.eager(*w.args), w.fused(*w.args)
    assert 0 < accuracy.max_rel_err(eager, ref) <= w.tolerance  # the float32 model differs from the float64 one
    assert 0 < accuracy.max_rel_err(fused, ref) <= w.tolerance
    assert accuracy.max_rel_err(fused * (1 + 10 * w.tolerance), ref) > w.tolerance


def test_linear_coefficients_note_matches_the_reference_aliasing():
    # The note says the reference returns t itself for Linear / ReLinear: keep it true.
    import ucgm_fast
    from cases import transport

    t = torch.rand(8) * 0.9 + 0.05
    aliased = {}
    for name in ucgm_fast.TRANSPORTS:
        outs = ucgm_fast.reference.coefficients(t, name)
        names = [n for n, o in zip(("alpha_in", "gamma_in", "alpha_to", "gamma_to"), outs) if o is t]
        if names:
            aliased[name] = names[0]
    assert aliased == transport.ALIASED


def test_in_turn_prepare_runs_untimed_before_each_sample():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    budget = timing.Budget(warmup_s=0.0, sample_s=0.0, total_s=0.0, min_repeats=2, max_repeats=2)
    timing.time_in_turn(fns, (), torch.device("cpu"), budget, {"a": 0.0, "b": 0.0},
                        prepare={"b": lambda: calls.append("prepare b")})
    assert calls == ["a", "b"] + ["a", "prepare b", "b"] * 2  # warm-up, then two rounds


def test_fused_train_step_keeps_its_own_gradients_when_timed_in_turn():
    # Both steps share the parameters; the published zero_grad(set_to_none=True) detaches the fused
    # step's gradient views. Its prepare hook re-attaches them, so its step is ucgm-train's.
    from harness.case import Plan
    from cases import end_to_end as e2e

    plan = Plan(torch.device("cpu"), smallest=True, compile=False)
    w = e2e._train_workload(plan, "DiT-S/2", (10, 4, 8, 8), "lambda=1,enhanced", False)
    w.fused(*w.args)
    alone = [f.clone() for f in w.fused.grads.flats]
    w.eager(*w.args)
    w.prepare["fused"]()
    w.fused(*w.args)
    assert all(torch.equal(a, f) for a, f in zip(alone, w.fused.grads.flats))  # not the sum of both steps
    assert all(p.grad is v for p, v in zip(w.fused.grads.params, w.fused.grads.views))


def test_in_turn_timing_alternates_the_peers():
    calls = []
    fns = {name: (lambda x, name=name: calls.append(name) or x.sqrt()) for name in ("eager", "fused", "graph")}
    x = torch.rand(100) + 0.5
    first = {name: timing.first_call(fn, (x,), torch.device("cpu"))[0] for name, fn in fns.items()}
    calls.clear()
    budget = timing.Budget(warmup_s=0.0, sample_s=0.0, total_s=0.0, min_repeats=4, max_repeats=4)
    t = timing.time_in_turn(fns, (x,), torch.device("cpu"), budget, first)
    assert set(t) == set(fns)
    # one warm-up call each, then one sample of each peer per round, in turn
    assert calls == ["eager", "fused", "graph"] * 5
    for name, tn in t.items():
        assert tn.repeats == 4 and tn.inner == 1 and tn.first_call_s == first[name]
        assert 0 < tn.min_ms <= tn.median_ms <= tn.max_ms


@pytest.mark.parametrize("name,expected", [("NVIDIA H100 80GB HBM3", "nvidia-h100"), ("NVIDIA H200", "nvidia-h200"),
                                           ("NVIDIA A100-SXM4-40GB", "nvidia-a100"),
                                           ("NVIDIA GeForce RTX 4090", "nvidia-geforce-rtx-4090")])
def test_result_file_names_from_gpu_names(name, expected):
    assert env.slug(name) == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_event_timing_with_l2_flush():
    device = torch.device("cuda")
    flusher = timing.L2Flusher(device)
    assert flusher.buffer.numel() * 4 > flusher.cache_bytes
    x = torch.rand(1 << 20, device=device) + 0.5
    t, out = timing.time_call(torch.sqrt, (x,), device, timing.QUICK_CUDA, flusher, flush=True)
    assert torch.allclose(out, x.sqrt()) and t.l2_flushed and t.inner == 1
    assert 0 < t.min_ms <= t.median_ms <= t.max_ms
    copy = timing.copy_bandwidth(1 << 22, device, timing.QUICK_CUDA, flusher)
    assert copy["gbps"] > 10 and copy["l2_flushed"]


def test_a_broken_row_is_reported_and_the_rest_still_run(tmp_path, monkeypatch):
    import types
    from harness.case import Case

    def broken_build():
        raise TypeError("signature changed")

    broken = types.SimpleNamespace(cases=lambda plan: [
        Case("broken", "broken_op", "", (3,), torch.float32, "smallest", broken_build)])
    real_discover = run.discover

    def discover_with_broken(package):
        groups, skipped = real_discover(package)
        return {**groups, "broken": broken}, skipped

    monkeypatch.setattr(run, "discover", discover_with_broken)
    status, rows, result = _run(tmp_path, "--no-compile", "--ops", "decode", "broken_op")
    assert status == 1
    assert {r["op"] for r in rows} == {"decode"} and len(rows) == 6
    assert len(result["errors"]) == 1 and "signature changed" in result["errors"][0]


def test_profile_objective_reports_both_peers(tmp_path, capsys):
    import profile_objective

    out = tmp_path / "profile.txt"
    assert profile_objective.main(["--device", "cpu", "--shape", "8,2,3,3", "--steps", "2", "--rows", "5",
                                   "--out", str(out)]) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out
    for peer in ("fused (UCGM.loss)", "eager (reference.training_loss)"):
        line = next(ln for ln in text.splitlines() if ln.startswith(f"== {peer}: "))
        assert float(line.split(": ")[1].split(" ms")[0]) > 0
    # the published-style objective is many small ops, the fused one few: the counts say so
    counts = [int(ln.split("per step: ")[1].split(" aten")[0]) for ln in text.splitlines() if "aten ops" in ln]
    assert len(counts) == 2 and 0 < counts[0] < counts[1]
    assert "Self CPU time total" in text
    # each step less its own model calls: 3 for UCGM.loss (one batched pair), 4 for the published step
    own = {ln.split(":")[0].strip(): ln for ln in text.splitlines() if " model calls alone " in ln}
    assert set(own) == {"fused", "eager"}
    assert "- 3 model calls" in own["fused"] and "- 4 model calls" in own["eager"]
    for ln in own.values():
        total, calls, rest = (float(v) for v in re.findall(r"\d+\.\d+", ln))
        assert 0 < calls < total and abs(total - calls - rest) < 2e-3
    assert "x outside the model calls" in text


def test_redraw_draws_the_chart_from_the_json(tmp_path):
    status, _, _ = _run(tmp_path, "--no-compile", "--ops", "decode")
    assert status == 0
    png, md = tmp_path / "bench.png", tmp_path / "bench.md"
    png.unlink()
    md.write_text(md.read_text().replace("![speedups](bench.png)", ""))
    assert run.main(["--redraw", str(tmp_path / "bench.json")]) == 0
    assert png.stat().st_size > 0 and "![speedups](bench.png)" in md.read_text()
