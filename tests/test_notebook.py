"""examples/kaggle/mlm-ddp.ipynb runs top to bottom as written (nbclient, a real IPython kernel: `!torchrun`,
`%pip`, `%cd`), against the seeded Hugging Face caches, with its parameter cell overridden (papermill's way: a
cell inserted after the one tagged `parameters`) to shorten the run. Any cell error fails the test."""

from __future__ import annotations

import json
import os
import sys

import pytest
from helpers import ROOT, free_port, read_json

NOTEBOOK = os.path.join(ROOT, "examples", "kaggle", "mlm-ddp.ipynb")


def load():
    import nbformat

    return nbformat.read(NOTEBOOK, as_version=4)


def with_parameters(nb, values: dict):
    import nbformat

    (index,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    cell = nbformat.v4.new_code_cell(
        "\n".join(f"{k} = {v!r}" for k, v in values.items()), metadata={"tags": ["injected-parameters"]}
    )
    nb.cells.insert(index + 1, cell)
    return nb


def test_the_repository_copy_has_no_outputs():
    nb = load()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])


def test_the_notebook_runs_top_to_bottom(tmp_path, hf_env):
    from nbclient import NotebookClient

    out = str(tmp_path / "run")
    # The session directory holds the checkout, as after the clone cell: the notebook finds it and moves into it.
    os.symlink(ROOT, tmp_path / "mlm-ddp")
    # A short run: 2 small steps (the default batch, 32 x 128, costs 7 s a step on a CPU), 16 evaluation examples.
    nb = with_parameters(
        load(),
        {
            "TRAIN_ARGS": "--max_train_steps 2 --per_device_train_batch_size 4 --max_eval_samples 16 --logging_steps 1",
            "NPROC": 2,
            "SESSION_HOURS": 1,
            "OUTPUT_DIR": out,
        },
    )
    env = {
        **os.environ,
        **hf_env,
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "WANDB_MODE": "offline",
        "PET_MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
    }
    env.pop("WANDB_API_KEY", None)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)  # raises CellExecutionError on the first failing cell
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "platform: local" in text and "W&B: offline" in text
    assert "2 process(es) on 0 GPU(s)" in text and "--max_runtime " in text
    assert "finished at step 2 on all 2 ranks" in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the loss and perplexity curves, inline
    assert f"model: {out}" in text and text.count("\n> ") >= 8  # predict.py's samples
    test = read_json(os.path.join(out, "test_results.json"))
    assert json.dumps(test, indent=1) in text


@pytest.mark.parametrize(
    "limit, started_ago, expected", [(12, 0, 12 * 3600 - 1200), (12, 3600, 11 * 3600 - 1200), (1, 3000, 60)]
)
def test_the_time_budget_is_what_the_session_has_left(limit, started_ago, expected, monkeypatch):
    """The budget cell's arithmetic: the platform's limit less the kernel's age and the reserve, at least 60 s."""
    nb = load()
    (source,) = [c.source for c in nb.cells if "max_runtime" in c.source and c.cell_type == "code"]
    budget_lines = source[source.index("hours = ") : source.index("print(")]
    scope = {
        "SESSION_HOURS": limit,
        "PLATFORM": "kaggle",
        "RESERVE_MINUTES": 20,
        "time": FakeTime(started_ago),
        "kernel_started": lambda: 0.0,
    }
    exec(budget_lines, scope)
    assert scope["budget"] == f"--max_runtime {expected}"


class FakeTime:
    def __init__(self, now: float):
        self.now = now

    def time(self) -> float:
        return self.now
