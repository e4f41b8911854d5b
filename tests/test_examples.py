"""The examples run: each script in ``examples/`` executes as a plain Python script (its own
assertions are the checks) and writes its figure; each uses only saebridge's public API and
has its line and figure in the README.

Each example is copied into a temporary folder and run there with ``runpy`` (as
``__main__``), so its figure lands beside the copy and the committed figures stay as they
are. All run in this one process: importing TransformerLens and nnsight once, not once per
script, keeps the set well under two minutes on a 2-core CPU.
"""

from __future__ import annotations

import ast
import re
import runpy
import shutil
from pathlib import Path

import pytest

matplotlib = pytest.importorskip("matplotlib", reason="the examples need the 'examples' extra")
matplotlib.use("Agg")  # non-interactive, whatever MPLBACKEND says

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TASKS = sorted(p.name for p in EXAMPLES.glob("[0-9][0-9]_*.py"))
"""The numbered, notebook-style examples (one per research task)."""
PNG = b"\x89PNG\r\n\x1a\n"


def run_example(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run ``examples/name`` from a copy in ``tmp_path``; the folder it wrote into."""
    import matplotlib.pyplot as plt

    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)
    script = tmp_path / name
    shutil.copy(EXAMPLES / name, script)
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        plt.close("all")
    return tmp_path


def test_there_is_one_example_per_task() -> None:
    assert len(TASKS) == 7, TASKS


@pytest.mark.parametrize("name", TASKS)
def test_example_runs_and_writes_its_figure(name: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    folder = run_example(name, tmp_path, monkeypatch)
    figure = folder / "figures" / name.replace(".py", ".png")
    assert figure.read_bytes().startswith(PNG), f"{name} wrote no figure at {figure}"


def test_quickstart_still_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit) as exit_:
        run_example("quickstart.py", tmp_path, monkeypatch)
    assert exit_.value.code == 0


@pytest.mark.parametrize("name", TASKS)
def test_example_is_a_notebook_on_the_public_api(name: str) -> None:
    """Percent-format cells; no underscore name of saebridge (imported or as an attribute);
    the committed figure exists."""
    text = (EXAMPLES / name).read_text(encoding="utf-8")
    assert text.startswith("# %% [markdown]") and text.count("\n# %%\n") >= 3, name
    private = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("saebridge"):
            parts = (node.module or "").split(".") + [a.name for a in node.names]
            private += [p for p in parts if p.startswith("_")]
        elif isinstance(node, ast.Attribute) and re.fullmatch(r"_[^_].*", node.attr):
            private.append(node.attr)
    assert not private, f"{name} uses private names {private}"
    assert (EXAMPLES / "figures" / name.replace(".py", ".png")).read_bytes().startswith(PNG)


def test_readme_has_a_line_and_a_figure_per_example() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Examples", 1)[1].split("\n## ", 1)[0]
    for name in TASKS:
        assert f"(examples/{name})" in section, f"README's Examples section lacks {name}"
        assert f"(examples/figures/{name.replace('.py', '.png')})" in section, name
