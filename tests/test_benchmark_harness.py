"""The benchmark harness's reporting (benchmarks/common.py, benchmarks/report.py): what a
user reads after ``python -m benchmarks``. Tiny functions timed, nothing asserted about speed."""

from __future__ import annotations

import dataclasses
import os
import sys

import torch

from benchmarks import common, report


def _doc(results, **metadata) -> dict:
    meta = {"device": "cpu", "device_name": "x86_64", "torch": torch.__version__,
            "triton": None, "date": "today", "memory_method": common.CPU_MEMORY_METHOD,
            "cpu_count": 2, "load_average_1m_at_start": 1.0, "load_average_1m_at_end": 1.5}
    meta.update(metadata)
    return report.build(meta, results, [])


def test_every_timed_row_has_min_median_max():
    calls = []
    result = common.measure(
        common.Result(suite="replay", name="torch/plain", mode="forward", dtype="float32",
                      shape=[4, 8]),
        lambda: calls.append(torch.ones(4, 8).sum()), torch.device("cpu"),
        common.TimingConfig.for_device(torch.device("cpu"), quick=True))
    assert result.status == "ok" and result.reps >= 2
    assert result.min_ms <= result.median_ms <= result.max_ms
    row = dataclasses.asdict(result)
    assert report._spread(row) == f"{report._ms(result.min_ms)}–{report._ms(result.max_ms)}"


def test_replay_rows_get_a_table_in_the_run_and_in_the_readme_section():
    plain = common.Result(suite="replay", name="torch/plain", mode="forward", dtype="bfloat16",
                          shape=[16, 1000], median_ms=2.0, min_ms=1.5, max_ms=3.0, reps=3,
                          extra_peak_mb=1.0)
    kept = common.Result(suite="replay", name="torch/kept-64", mode="forward", dtype="bfloat16",
                         shape=[16, 1000], median_ms=1.0, min_ms=0.5, max_ms=1.25, reps=3,
                         extra_peak_mb=0.25, baseline="torch/plain")
    doc = _doc([plain, kept])
    for text in (report.markdown(doc), report.readme_section(doc)):
        assert report.REPLAY_TITLE in text
        assert "| torch/kept-64 | bfloat16 | 16 | 1000 | forward | 1.000 | 0.500–1.250 | 3 |" in text
        assert "0.50× time, 0.25× memory" in text


def test_busy_machine_is_flagged():
    assert common.busy_machine_warning(1.9, 2) is None
    assert common.busy_machine_warning(None, 2) is None
    assert "load average 4.50 above its 2 cores" in common.busy_machine_warning(4.5, 2)
    assert "busy machine" not in report.header(_doc([]))
    assert "**Warning: busy machine: load average 4.50" in report.header(
        _doc([], load_average_1m_at_end=4.5))


def test_profiler_log_lines_are_dropped_and_other_stderr_kept(capfd):
    def write_to_fd_2() -> None:  # what Kineto (C++) does, below Python's sys.stderr
        os.write(2, b"USDT:2026-12-03 08:32:33 10103:10103 SyncActivityProfilerHandler.cpp:59]"
                    b" profiler_stop\n")
        os.write(2, b"a warning of the op itself\n")
        print("printed by Python", file=sys.stderr)

    with common.quiet_profiler_log():
        write_to_fd_2()
    err = capfd.readouterr().err
    assert "profiler_stop" not in err
    assert "a warning of the op itself" in err and "printed by Python" in err
    # and the real profiler, as the CPU memory measure runs it
    assert common.cpu_peak_bytes(lambda: torch.ones(1024)) >= 4096
    assert "profiler_st" not in capfd.readouterr().err


def test_contention_rows_for_entropy_and_sampler_with_and_without_busy_loops():
    """The contention suite's rows (tiny shapes): both ops, both implementations, without
    and with the busy loops; each row timed, with the load average in its note, and a table
    in the run and in the README section comparing each row with torch-eager and with
    itself without the added load."""
    from benchmarks import contention

    cpu = torch.device("cpu")
    results: list[common.Result] = []
    contention.run(cpu, common.TimingConfig.for_device(cpu, quick=True), results,
                   quick=True, smoke=True)
    loaded = contention.loaded_mode(contention.core_count())
    expected = {(f"{op}, {load}", name) for op in ("entropy", "sampler")
                for load in (report.CONTENTION_QUIET, loaded)
                for name in ("hapo-torch", "torch-eager")}
    assert {(r.mode, r.name) for r in results} == expected
    for r in results:
        assert r.suite == "contention" and r.status == "ok", (r.mode, r.name, r.note)
        assert r.reps == 2 and r.min_ms <= r.median_ms <= r.max_ms
        assert "load average" in r.note
    doc = _doc(results)
    for text in (report.markdown(doc), report.readme_section(doc)):
        assert report.CONTENTION_TITLE in text
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in report.contention_table(doc).splitlines()[2:]]
    assert len(rows) == 8
    for mode, impl, *_, vs_eager, vs_quiet, _note in rows:
        assert (vs_eager.endswith("×")) == (impl == "hapo-torch"), (mode, impl)
        assert (vs_quiet.endswith("×")) == mode.endswith(loaded), (mode, impl)


def test_busy_loops_stop_with_the_block_and_end_by_themselves():
    from benchmarks.contention import busy_loops

    with busy_loops(2) as procs:
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
    assert all(p.returncode is not None for p in procs)
    with busy_loops(1, limit_s=0.1) as procs:
        assert procs[0].wait(timeout=120) == 0  # its own time limit, not a kill
