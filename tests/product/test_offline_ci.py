"""Offline and under CI: an unprepared dataset fails within its timeout, missing real data
fails under CI, a hung test is stopped."""

import pathlib
import subprocess
import sys
import time

import pytest

from flaxcnn.data import input_pipeline

REPO = pathlib.Path(__file__).resolve().parents[2]

# A restore that fails inside orbax leaves tensorstore coroutines behind, reported when they
# are collected after their event loop closed; harmless, and not this project's to fix.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

# --- Offline, CI data -----------------------------------------------------------------------


@pytest.fixture
def silent_port():
    """A local TCP port whose backlog is full: a connection to it hangs (no answer at all)
    until the client's timeout, as to a host that drops packets."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    pending = []
    for _ in range(3):
        client = socket.socket()
        client.setblocking(False)
        client.connect_ex(("127.0.0.1", port))
        pending.append(client)
    time.sleep(0.1)
    yield port
    for client in pending:
        client.close()
    server.close()


@pytest.mark.parametrize("target", ["silent port", "unresolvable name"])
def test_unprepared_dataset_with_the_real_probe_offline_fails_within_the_timeout(
    tmp_path, monkeypatch, silent_port, target
):
    address = f"127.0.0.1:{silent_port}" if target == "silent port" else "no-such-host.invalid:443"
    monkeypatch.setenv(input_pipeline.PROBE_ENV, address)
    monkeypatch.setenv(input_pipeline.PROBE_TIMEOUT_ENV, "1.5")
    probe, probe_seconds = input_pipeline._network_reachable, []

    def timed_probe(*args, **kwargs):  # The probe's own time, not the tfds builder's.
        start = time.perf_counter()
        try:
            return probe(*args, **kwargs)
        finally:
            probe_seconds.append(time.perf_counter() - start)

    monkeypatch.setattr(input_pipeline, "_network_reachable", timed_probe)
    with pytest.raises(input_pipeline.DataError, match="not prepared .* network is unreachable"):
        input_pipeline.load_split("mnist", "train", str(tmp_path))
    [elapsed] = probe_seconds
    assert elapsed < 1.5 + 1.0  # Its timeout, and time to give up.
    if target == "silent port":
        assert elapsed >= 1.4  # It did wait for the answer that never came.


def test_real_data_missing_fails_under_ci_and_skips_elsewhere(
    tmp_path, monkeypatch, find_shared_tfds
):

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="real MNIST not found"):
        find_shared_tfds(tmp_path)
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="required when CI is set"):
        find_shared_tfds(tmp_path)
    (tmp_path / "mnist").mkdir()
    assert find_shared_tfds(tmp_path) == str(tmp_path)


def test_a_hung_test_is_stopped_by_the_default_timeout(tmp_path):
    """pyproject.toml bounds every test (pytest-timeout); shown on a test that hangs, with the
    project's settings and the bound shortened to 1 s."""
    import tomllib

    settings = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert settings["tool"]["pytest"]["ini_options"]["timeout"] == 300
    (tmp_path / "test_hang.py").write_text("import time\n\ndef test_hang():\n    time.sleep(600)\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "timeout=1"]
        + ["-c", str(REPO / "pyproject.toml"), "--rootdir", str(tmp_path), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "Timeout (>1.0s)" in result.stdout, result.stdout[-2000:]
