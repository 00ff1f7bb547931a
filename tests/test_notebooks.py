"""Every notebook in notebooks/ runs top to bottom (code cells executed in
order in one namespace, as a kernel would).  No Jupyter needed."""
import json
import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no notebook"


# Values for a notebook's cell tagged "parameters" (papermill's convention),
# set after that cell runs: smaller sizes, the same code paths.
PARAMETERS = {"CALIB_TOKENS": 2048, "EVAL_TOKENS": 2048, "MC_ITEMS": 16}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
    pytest.importorskip("torch")
    # no display: figures render off screen and plt.show() returns at once
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = json.loads(path.read_text())
    ns = {"__name__": "__main__"}
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        exec(compile(src, f"{path.name}[cell {i}]", "exec"), ns)  # noqa: S102 - the project's own notebook
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            missing = [k for k in PARAMETERS if k not in ns]
            assert not missing, f"{path.name}: its parameters cell does not set {missing}"
            ns.update(PARAMETERS)
