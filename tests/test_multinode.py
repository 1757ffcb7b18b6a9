"""Issue 7 (a): several nodes on one machine, each a torchrun with a loopback c10d rendezvous.

Each node gets its own working directory, standing for its own disk: relative --output_dir and --data_cache_dir
land there, so the tests see which node wrote what.
"""

import os
import re
import stat
import subprocess
import sys

import pytest
from helpers import ROOT, Process, _env, free_port, make_text_file, run_train, start, tiny_args, wait_all
from test_ddp import load_weights, max_abs_diff

STEPS = 4


def start_node(
    node_rank: int,
    nnodes: int,
    nproc: int,
    port: int,
    script: str,
    args: list[str],
    cwd: str,
    extra_env: dict | None = None,
) -> Process:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--node_rank={node_rank}",
        f"--nproc_per_node={nproc}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{port}",
        "--rdzv_id=mlm-test",
        "--local_addr=127.0.0.1",
        "--max-restarts=0",
        script,
        *args,
    ]
    return start(cmd, extra_env, cwd)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return make_text_file(str(d / "train.txt"), n_lines=300, seed=1), make_text_file(
        str(d / "valid.txt"), n_lines=60, seed=2
    )


def common_args(tiny_config_dir, tokenizer_path, corpus) -> dict:
    return dict(
        train_file=corpus[0],
        validation_file=corpus[1],
        max_train_steps=STEPS,
        eval_steps=2,
        per_device_train_batch_size=4,
        seed=11,
    )


def test_two_nodes_equal_one_node_and_only_global_rank_0_writes(tmp_path, corpus, tiny_config_dir, tokenizer_path):
    kw = common_args(tiny_config_dir, tokenizer_path, corpus)
    nodes = [tmp_path / f"node{n}" for n in (0, 1)]
    port = free_port()
    procs = []
    for n, cwd in enumerate(nodes):
        cwd.mkdir()
        args = tiny_args(tiny_config_dir, tokenizer_path, "run", "cache", **kw)  # relative: each node's disk
        procs.append(start_node(n, 2, 1, port, os.path.join(ROOT, "train_ddp.py"), args, str(cwd)))
    results = wait_all(procs, timeout=240)
    for r in results:
        assert r.returncode == 0, r.output[-3000:]
    assert "2 x cpu" in results[0].output
    single = str(tmp_path / "single")
    r = run_train(tiny_args(tiny_config_dir, tokenizer_path, single, str(tmp_path / "cache"), **kw), nproc=2)
    assert r.returncode == 0, r.output[-3000:]
    two_nodes = str(nodes[0] / "run")
    assert max_abs_diff(load_weights(two_nodes, STEPS), load_weights(single, STEPS)) <= 1e-5
    # Global rank 0 (node 0) wrote the checkpoints, best/ and the history; node 1 wrote no run files at all.
    assert sorted(os.listdir(os.path.join(two_nodes, "checkpoints"))) == ["step-2", "step-4"]
    assert os.path.isfile(os.path.join(two_nodes, "best", "model.safetensors"))
    assert not os.path.exists(nodes[1] / "run")
    # Each node built the tokenised-data cache on its own disk (--cache_scope node, the default).
    for cwd in nodes:
        assert any(os.path.isfile(os.path.join(cwd, "cache", d, "meta.json")) for d in os.listdir(cwd / "cache"))

    # Resuming reads the checkpoint on every rank: with run directories that are not shared, a clear error on
    # every node instead of ranks that load different states; nothing saved is touched.
    kw["max_train_steps"] = STEPS + 2
    procs = [
        start_node(
            n,
            2,
            1,
            port,
            os.path.join(ROOT, "train_ddp.py"),
            tiny_args(tiny_config_dir, tokenizer_path, "run", "cache", **kw),
            str(cwd),
        )
        for n, cwd in enumerate(nodes)
    ]
    results = wait_all(procs, timeout=240)
    assert all(r.returncode != 0 for r in results)
    output = "".join(r.output for r in results)
    assert output.count("is not visible on every node") == 1, output[-3000:]
    assert not re.search(r'File ".*(train_ddp\.py|/mlm/)', output), output[-3000:]  # torchrun's report only
    assert sorted(os.listdir(os.path.join(two_nodes, "checkpoints"))) == ["step-2", "step-4"]


PROBE = r"""
import os, sys, time
from mlm.common.distributed import init_distributed, main_process_first, teardown
env = init_distributed(60)
def prepare():
    with open(sys.argv[1], "a") as fh:
        fh.write(f"start {{env.rank}} {{env.local_rank}} {{time.time()}}\n")
    time.sleep(0.5)
    with open(sys.argv[1], "a") as fh:
        fh.write(f"end {{env.rank}} {{env.local_rank}} {{time.time()}}\n")
main_process_first(env, prepare, per_node=sys.argv[2] == "node")
teardown(env)
"""


@pytest.mark.parametrize("scope", ["node", "shared"])
def test_cache_scope_decides_who_prepares_first(tmp_path, scope):
    """2 nodes x 2 processes. node: each node's local rank 0 prepares, then the rest; shared: global rank 0 alone."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE.format(root=ROOT))
    log, port = str(tmp_path / "log"), free_port()
    procs = [start_node(n, 2, 2, port, str(script), [log, scope], str(tmp_path)) for n in (0, 1)]
    for r in wait_all(procs, timeout=120):
        assert r.returncode == 0, r.output[-3000:]
    events = [line.split() for line in open(log).read().splitlines()]
    assert len(events) == 8 and sorted({int(e[1]) for e in events}) == [0, 1, 2, 3]
    leaders = {int(e[1]) for e in events if (e[2] == "0" if scope == "node" else e[1] == "0")}
    assert leaders == ({0, 2} if scope == "node" else {0})
    last_leader_end = max(float(e[3]) for e in events if e[0] == "end" and int(e[1]) in leaders)
    first_other_start = min(float(e[3]) for e in events if e[0] == "start" and int(e[1]) not in leaders)
    first_leader_start = min(float(e[3]) for e in events if e[0] == "start" and int(e[1]) in leaders)
    assert last_leader_end <= first_other_start
    if scope == "node":  # the two nodes prepare at the same time, not one after the other
        assert max(float(e[3]) for e in events if e[0] == "start" and int(e[1]) in leaders) < min(
            float(e[3]) for e in events if e[0] == "end" and int(e[1]) in leaders
        )
    assert first_leader_start < first_other_start


def _fake(path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_example_runs_two_nodes(tmp_path, corpus, tiny_config_dir, tokenizer_path):
    """examples/slurm/train.sbatch with stand-ins for srun (one task per node, SLURM_NODEID set) and scontrol."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake(bin_dir / "scontrol", "#!/usr/bin/env bash\necho 127.0.0.1\n")
    _fake(
        bin_dir / "srun",
        "#!/usr/bin/env bash\n"
        f"echo called >> {tmp_path / 'srun-calls'}\n"
        "while [[ $1 == --* ]]; do shift; done\npids=()\nfor ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do\n"
        '  SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!)\ndone\n'
        'rc=0\nfor p in "${pids[@]}"; do wait "$p" || rc=$?; done\nexit $rc\n',
    )
    out = str(tmp_path / "run")
    args = tiny_args(
        tiny_config_dir,
        tokenizer_path,
        out,
        str(tmp_path / "cache"),
        **common_args(tiny_config_dir, tokenizer_path, corpus),
    )
    env = {
        "PATH": f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "node-[1-2]",
        "SLURM_JOB_ID": "77",
        "SLURM_SUBMIT_DIR": ROOT,
        "NPROC_PER_NODE": "1",
        "MASTER_PORT": str(free_port()),
        "PYTHON": sys.executable,
        "MAX_RESTARTS": "0",
    }
    p = subprocess.run(
        ["bash", os.path.join(ROOT, "examples", "slurm", "train.sbatch"), *args],
        cwd=str(tmp_path),
        env=_env(env),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "finished at step 4 on all 2 ranks" in p.stdout
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step-2", "step-4"]
    # A bad option fails once, before srun starts anything.
    p = subprocess.run(
        ["bash", os.path.join(ROOT, "examples", "slurm", "train.sbatch"), "--learning_rate", "-1"],
        cwd=str(tmp_path),
        env=_env(env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2 and p.stderr.count("error:") == 1 and "--learning_rate" in p.stderr, p.stderr
    assert (tmp_path / "srun-calls").read_text().splitlines() == ["called"]  # only the first job's srun
