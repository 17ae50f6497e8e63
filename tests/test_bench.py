"""flaxcnn.bench, the benchmarks' harness: a worker's answer read from its last RESULT line,
a failed or overlong process counted as no result, medians over the runs that finished."""

import os
import sys

from flaxcnn import bench


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_worker_s_last_result_line_is_its_answer_and_a_failure_is_none(capsys):
    code = "from flaxcnn import bench; print('noise'); bench.print_result({'a': 1}); "
    env = bench.environment()
    assert bench.run_worker(python(code + "bench.print_result({'a': 2})"), "w", env, ".") == {
        "a": 2
    }
    assert bench.run_worker(python(code + "raise SystemExit(3)"), "w", env, ".") is None
    assert bench.run_worker(python("print('no result')"), "w", env, ".") is None
    assert capsys.readouterr().out.count("w failed:") == 2


def test_a_command_is_timed_to_its_exit_and_stopped_past_its_timeout(capsys):
    env = bench.environment()
    seconds, stdout = bench.time_command(python("print('answer')"), "c", env, ".")
    assert stdout == "answer\n" and seconds > 0
    assert bench.time_command(python("import time; time.sleep(5)"), "c", env, ".", 0.5) is None
    assert "c: over 0.5 s, stopped" in capsys.readouterr().out


def test_the_environment_compiles_afresh_and_medians_skip_failed_runs(monkeypatch):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/tmp/shared-cache")
    env = bench.environment(EXTRA="1")
    assert "JAX_COMPILATION_CACHE_DIR" not in env and env["EXTRA"] == "1"
    assert env["JAX_PLATFORMS"] == os.environ.get("JAX_PLATFORMS", "cpu")
    assert bench.median_of([{"s": 3.0}, None, {"s": 1.0}, {"s": 2.0}], "s") == 2.0
    assert bench.median_of([None], "s") is None
    assert (bench.fmt(None), bench.fmt(2.0), bench.fmt(1234.0, ",.0f")) == ("-", "2.0", "1,234")
