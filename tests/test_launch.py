"""launch.sh: usage, the torchrun command it builds (GPU count, CPU fallback, several nodes), and a real run."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
from helpers import ROOT, _env, make_text_file, tiny_args

LAUNCH = os.path.join(ROOT, "launch.sh")


def launch(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    # OMP_NUM_THREADS and NPROC are left to each test: they are what launch.sh decides.
    base = {
        k: v
        for k, v in _env({"PYTHON": sys.executable}).items()
        if k not in ("OMP_NUM_THREADS", "NPROC", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    return subprocess.run(
        ["bash", LAUNCH, *args], cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=timeout
    )


def fake_nvidia_smi(tmp_path, gpus: int) -> str:
    """A PATH entry whose nvidia-smi -L lists `gpus` GPUs (and a MIG line, which is not a GPU)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    listing = "".join(
        f"GPU {i}: NVIDIA H100 (UUID: GPU-{i})\\n  MIG 1g.10gb Device 0: (UUID: MIG-{i})\\n" for i in range(gpus)
    )
    tool = bin_dir / "nvidia-smi"
    tool.write_text(f'#!/bin/sh\n[ "$1" = -L ] && printf "{listing}"\nexit 0\n')
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def test_help_explains_the_environment():
    p = launch(["--help"], {})
    assert p.returncode == 0, p.stderr
    for word in (
        "NNODES",
        "NODE_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "NPROC",
        "MAX_RESTARTS",
        "python train_ddp.py --help",
    ):
        assert word in p.stdout, word


def test_is_executable():
    assert os.access(LAUNCH, os.X_OK)


def test_one_process_per_gpu_and_arguments_pass_through(tmp_path):
    env = {"PATH": fake_nvidia_smi(tmp_path, 4), "LAUNCH_DRY_RUN": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    p = launch(["--output_dir", "a b", "--seed", "3"], env)
    assert p.returncode == 0, p.stderr
    assert "--nproc_per_node=4" in p.stdout and "--standalone" in p.stdout and "--max-restarts=3" in p.stdout
    assert p.stdout.rstrip().endswith(f"{os.path.join(ROOT, 'train_ddp.py')} --output_dir a\\ b --seed 3")
    p = launch([], {**env, "CUDA_VISIBLE_DEVICES": "1,3"})
    assert "--nproc_per_node=2" in p.stdout
    p = launch([], {**env, "NPROC": "3"})
    assert "--nproc_per_node=3" in p.stdout


def recording_python(tmp_path) -> tuple[str, str]:
    """A PYTHON that logs each command line it is given, then runs it with this interpreter; (path, log)."""
    log, path = tmp_path / "python-calls.log", tmp_path / "python"
    path.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{log}"\nexec "{sys.executable}" "$@"\n')
    path.chmod(0o755)
    log.write_text("")
    return str(path), str(log)


def test_cpu_fallback_uses_gloo_and_splits_the_cores(tmp_path):
    python, calls = recording_python(tmp_path)
    p = launch([], {"CUDA_VISIBLE_DEVICES": "", "LAUNCH_DRY_RUN": "1", "PYTHON": python})
    assert p.returncode == 0, p.stderr
    assert "torch" not in open(calls).read()  # an empty CUDA_VISIBLE_DEVICES is no GPU, without asking torch
    cores = os.cpu_count() if not hasattr(os, "sched_getaffinity") else len(os.sched_getaffinity(0))
    n = 2 if cores >= 4 else 1
    assert f"--nproc_per_node={n}" in p.stdout
    assert f"gloo, OMP_NUM_THREADS={max(1, cores // n)}" in p.stderr
    p = launch([], {"CUDA_VISIBLE_DEVICES": "", "LAUNCH_DRY_RUN": "1", "OMP_NUM_THREADS": "5"})
    assert "OMP_NUM_THREADS=5" in p.stderr  # the user's setting is kept ...
    assert f"--nproc_per_node={n}" in p.stdout  # ... and does not change the process count


def test_several_nodes_use_a_c10d_rendezvous(tmp_path):
    env = {
        "PATH": fake_nvidia_smi(tmp_path, 8),
        "LAUNCH_DRY_RUN": "1",
        "NNODES": "2",
        "NODE_RANK": "1",
        "MASTER_ADDR": "node-a",
        "MASTER_PORT": "29600",
        "MAX_RESTARTS": "2",
    }
    p = launch(["--max_train_steps", "10"], env)
    assert p.returncode == 0, p.stderr
    for part in (
        "--nproc_per_node=8",
        "--nnodes=2",
        "--node_rank=1",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=node-a:29600",
        "--rdzv_id=mlm-ddp",
        "--max-restarts=2",
    ):
        assert part in p.stdout, part
    assert "--standalone" not in p.stdout


def test_an_elastic_job_gives_torchrun_min_and_max_nodes(tmp_path):
    env = {
        "PATH": fake_nvidia_smi(tmp_path, 2),
        "LAUNCH_DRY_RUN": "1",
        "NNODES": "1:2",
        "NODE_RANK": "5",
        "MASTER_ADDR": "node-a",
    }
    p = launch([], env)
    assert p.returncode == 0, p.stderr
    assert "--nnodes=1:2" in p.stdout and "--rdzv_backend=c10d" in p.stdout and "--node_rank" not in p.stdout


@pytest.mark.parametrize(
    "env, word",
    [
        ({"NNODES": "2"}, "MASTER_ADDR"),
        ({"NNODES": "3:2", "MASTER_ADDR": "node-a"}, "MIN must not exceed MAX"),
        ({"NNODES": "2", "MASTER_ADDR": "node-a", "NODE_RANK": "2"}, "NODE_RANK"),
        ({"NNODES": "two"}, "NNODES"),
        ({"NPROC": "0"}, "NPROC"),
        ({"MAX_RESTARTS": "-1"}, "MAX_RESTARTS"),
    ],
)
def test_bad_launch_settings_are_one_line_errors(env, word):
    p = launch([], {"CUDA_VISIBLE_DEVICES": "", **env})
    assert p.returncode == 2
    errors = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("launch.sh: error:") and word in errors[0], p.stderr


def test_cpu_run_to_completion(tmp_path, tiny_config_dir, tokenizer_path):
    text = make_text_file(str(tmp_path / "train.txt"), n_lines=300)
    args = tiny_args(
        tiny_config_dir,
        tokenizer_path,
        str(tmp_path / "out"),
        str(tmp_path / "cache"),
        train_file=text,
        max_train_steps=2,
        eval_steps=2,
    )
    p = launch(args, {"NPROC": "2", "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "finished at step 2 on all 2 ranks" in p.stdout, p.stdout[-3000:]
    assert os.path.isfile(tmp_path / "out" / "best" / "config.json")


def test_a_bad_option_is_reported_once_before_torchrun_starts(tmp_path):
    # With MAX_RESTARTS torchrun would retry a failing group: the options are checked once, before it starts.
    p = launch(
        ["--mlm_probability", "2", "--output_dir", str(tmp_path / "out")],
        {"NPROC": "2", "CUDA_VISIBLE_DEVICES": "", "MAX_RESTARTS": "3"},
    )
    assert p.returncode == 2, p.stdout + p.stderr
    errors = [line for line in p.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("error: --mlm_probability"), p.stderr
    assert "Traceback" not in p.stderr and "mlm-ddp" not in p.stdout  # no worker ever ran


def test_a_user_error_found_at_run_time_is_said_once_and_not_retried(tmp_path, tiny_config_dir, tokenizer_path):
    """A CSV without a text column passes the option check and fails on rank 0's data preparation: torchrun's
    restarts (MAX_RESTARTS 3, the default) end at once, the line is printed once, and the launch exits 2."""
    rows = tmp_path / "essays.csv"
    rows.write_text("essay_id,full_text\n" + "".join(f"{i},the cat sat on the mat {i}\n" for i in range(40)))
    args = tiny_args(
        tiny_config_dir, tokenizer_path, str(tmp_path / "out"), str(tmp_path / "cache"), train_file=str(rows)
    )
    p = launch(args, {"NPROC": "2", "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    output = p.stdout + p.stderr
    assert p.returncode == 2, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "'text'" in errors[0] and "--text_column" in errors[0], output[-3000:]
    assert output.count("mlm-ddp\n") <= 1  # no restarted attempt got as far as its banner
    assert not [n for n in os.listdir(os.environ.get("TMPDIR", "/tmp")) if n.startswith("mlm-user-error.")]


@pytest.mark.parametrize(
    "visible, gpus",
    [
        ("0,1,", 2),  # a trailing comma is no third GPU
        ("0,,1", 1),  # CUDA stops reading at the first empty entry
        ("1,0", 2),
        ("0,1,7", 2),  # an index this machine does not have ends the list
        ("1,1", 1),  # a repeated index too
        ("GPU-0f3c,1", 2),
        ("-1", 0),
    ],
)
def test_cuda_visible_devices_is_counted_as_cuda_reads_it(tmp_path, visible, gpus):
    env = {"PATH": fake_nvidia_smi(tmp_path, 4), "LAUNCH_DRY_RUN": "1", "CUDA_VISIBLE_DEVICES": visible}
    p = launch([], env)
    assert p.returncode == 0, p.stderr
    if gpus:
        assert f"--nproc_per_node={gpus}" in p.stdout and f"{gpus} GPU(s), nccl" in p.stderr, p.stderr
    else:
        assert "cpu, gloo" in p.stderr


def test_the_network_interface_reaches_gloo_and_nccl(tmp_path):
    env = {
        "PATH": fake_nvidia_smi(tmp_path, 2),
        "LAUNCH_DRY_RUN": "1",
        "NNODES": "2",
        "MASTER_ADDR": "node-a",
        "SOCKET_IFNAME": "eth1",
    }
    p = launch([], env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("GLOO_SOCKET_IFNAME=eth1 NCCL_SOCKET_IFNAME=eth1 "), p.stdout
    assert "GLOO_SOCKET_IFNAME=eth1" in p.stderr and "warning" not in p.stderr
    p = launch([], {**env, "NCCL_SOCKET_IFNAME": "ib0"})  # a variable the user set wins
    assert "GLOO_SOCKET_IFNAME=eth1 NCCL_SOCKET_IFNAME=ib0 " in p.stdout


def test_a_loopback_hostname_on_several_nodes_is_warned_about(tmp_path):
    bin_dir = tmp_path / "host-bin"
    bin_dir.mkdir()
    for tool, text in (("hostname", "echo node-a"), ("getent", "echo '127.0.1.1       node-a'")):
        (bin_dir / tool).write_text(f"#!/bin/sh\n{text}\n")
        (bin_dir / tool).chmod(0o755)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{fake_nvidia_smi(tmp_path, 2)}",
        "LAUNCH_DRY_RUN": "1",
        "NNODES": "2",
        "MASTER_ADDR": "node-a",
    }
    p = launch([], env)
    assert p.returncode == 0 and "warning: node-a resolves to 127.0.1.1" in p.stderr and "SOCKET_IFNAME" in p.stderr
    p = launch([], {**env, "GLOO_SOCKET_IFNAME": "eth0"})
    assert "warning" not in p.stderr
