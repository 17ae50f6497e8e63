"""The quickstart notebook (docs/quickstart.ipynb) runs top to bottom in a fresh kernel:
its model trains on the embedded dataset, its curves and predictions are drawn."""

import json
import pathlib

import nbclient
import nbformat

REPO = pathlib.Path(__file__).resolve().parents[2]

NOTEBOOK = REPO / "docs" / "quickstart.ipynb"
CELL_TIMEOUT_S = 120  # Seconds a cell may run: the notebook takes well under a minute.


def test_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch, run_command, data_dir):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # The kernel inherits this environment.
    monkeypatch.setenv("TFDS_DATA_DIR", data_dir)  # The embedded dataset, prepared already.
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))  # The test home has none.
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    outputs = [o for cell in notebook.cells for o in cell.get("outputs", [])]
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pictures) == 2  # The curves, then the predicted test images.
    results = json.loads((tmp_path / "runs" / "quickstart" / "results.json").read_text())
    assert results["test_accuracy"] > 0.9
    text = "".join(o.get("text", "") for o in outputs)
    assert f"test accuracy {results['test_accuracy']:.4f}" in text
    assert "predicted:" in text
    # The model class of a notebook cell, saved with the run, comes back in a new process.
    evaluated = run_command(
        "--workdir", str(tmp_path / "runs" / "quickstart"), module="flaxcnn.evaluate"
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert f"accuracy {results['test_accuracy']:.4f}" in evaluated.stdout
