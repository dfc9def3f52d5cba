"""notebooks/colab_tpu.ipynb runs as-is: executed cell by cell in a Jupyter kernel, on 20 steps."""

from __future__ import annotations

import base64
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from digitscape_jax.checkpointing import Checkpointer

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "colab_tpu.ipynb"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_notebook() -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    return notebook


def cell(notebook: nbformat.NotebookNode, cell_id: str) -> nbformat.NotebookNode:
    return next(c for c in notebook.cells if c.get("id") == cell_id)


def test_the_committed_notebook_is_clean_and_parameterised():
    notebook = read_notebook()
    assert notebook.nbformat == 4
    for c in notebook.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None, c.source
    parameters = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(parameters) == 1
    for name in ("STEPS = 20000", "ARCH", "MNIST_IDX = None", "CKPT_DIR", "INSTALL = True",
                 "USE_DRIVE = True",
                 'REPO_URL = "https://github.com/digitscape/digitscape-jax"'):
        assert name in parameters[0].source


@pytest.mark.slow
def test_the_notebook_trains_and_shows_its_pictures(tmp_path, mnist_idx, trained_run):
    notebook = read_notebook()
    workdir, ckpt = tmp_path / "work", tmp_path / "drive" / "ckpt"
    workdir.mkdir()
    overrides = {"STEPS": 20, "ARCH": "seed", "SAMPLE_EVERY": 10, "MNIST_IDX": str(mnist_idx),
                 "DATA_DIR": str(trained_run[0] / "tfds"), "CKPT_DIR": str(ckpt), "INSTALL": False,
                 "USE_DRIVE": False, "REPO_DIR": str(REPO)}
    parameters = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    # Added below the defaults, as papermill injects parameters.
    parameters.source += "\n# Injected by tests/test_notebook.py\n" + "".join(
        f"{name} = {value!r}\n" for name, value in overrides.items())

    # Any failing cell raises CellExecutionError. kernel "python3" is this interpreter's
    # ipykernel (jupyter_client starts it with sys.executable).
    NotebookClient(notebook, timeout=240, kernel_name="python3",
                   resources={"metadata": {"path": str(workdir)}}).execute()

    assert Checkpointer(ckpt, read_only=True).latest_step() == 20
    for name in ("generated_images.png", "progress.gif", "losses.png"):
        assert (ckpt / name).is_file(), name
    assert sorted(p.name for p in (tmp_path / "drive" / "generated_images").iterdir()) == [
        "generated_images_10.png", "generated_images_20.png"]
    assert (workdir / "digits.png").read_bytes().startswith(PNG_MAGIC)

    def text(cell_id: str) -> str:
        return "".join(o.get("text", "") for o in cell(notebook, cell_id).outputs)

    def images(cell_id: str, mime: str) -> list[bytes]:
        return [base64.b64decode(o.data[mime]) for o in cell(notebook, cell_id).outputs
                if mime in o.get("data", {})]

    assert "backend: cpu" in text("devices")
    assert "CpuDevice" in "".join(o.data.get("text/plain", "")
                                  for o in cell(notebook, "devices").outputs if "data" in o)
    training = text("train")
    assert "\r" in training and "20/20" in training and "step/s" in training  # the tqdm bar
    assert "done: 20 steps" in training
    # Two sample rows, losses.png and the final grid; the GIF as image/gif.
    pictures = images("pictures", "image/png")
    assert len(pictures) == 4 and all(p.startswith(PNG_MAGIC) for p in pictures)
    assert [g[:6] for g in images("pictures", "image/gif")] == [b"GIF89a"]
    assert images("sample", "image/png") == [(workdir / "digits.png").read_bytes()]
    assert "100 digits from" in text("sample")
