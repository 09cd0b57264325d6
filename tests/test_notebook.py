"""The quickstart notebook runs top to bottom and its model learns."""

import os
import re

import nbformat
import pytest
from conftest import REPO
from helpers import subprocess_env
from nbclient import NotebookClient

NOTEBOOK = os.path.join(REPO, "experiments", "notebooks", "quickstart.ipynb")


def _kernel_env() -> dict[str, str]:
  """This environment without the test suite's 8-device XLA flag: the notebook sets its own."""
  env = subprocess_env()
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _stdout(cell) -> str:
  return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")


def test_notebook_is_stored_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None


@pytest.mark.slow
@pytest.mark.xdist_group("subprocess")
def test_quickstart_notebook_runs_and_learns():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # "python3" resolves to this interpreter (the venv's): jupyter_client swaps a
  # bare "python" in the kernel spec for sys.executable.
  client = NotebookClient(nb, timeout=180, kernel_name="python3",
                          resources={"metadata": {"path": REPO}})
  client.execute(env=_kernel_env())

  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs), "no loss plot"
  devices = _stdout(next(c for c in nb.cells if "use_cpu_devices(8)" in c.source))
  assert devices.startswith("8 devices"), devices
  match = re.search(r"first_loss=([\d.]+) final_loss=([\d.]+)", _stdout(nb.cells[-1]))
  assert match, _stdout(nb.cells[-1])
  first, final = map(float, match.groups())
  assert final < first
