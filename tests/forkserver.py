"""Start a rank or a script of ours in milliseconds instead of seconds, for the tests.

Most of a multi-process test's time went into each new interpreter importing torch and transformers (about 6 of
the 8 seconds a 4-step, 2-rank run took). A fork server imports them once and forks a child per run: the child is
a real process, with its own pid, environment, working directory, stdin/stdout/stderr and exit status, that runs
the script as `python SCRIPT ARGS` would (runpy, `__main__`, atexit handlers, exit code). Ranks started this way
meet through gloo exactly as torchrun's do; tests of torchrun itself (its agent, restarts, elastic membership,
its handling of signals) run torchrun's own agent (torch.distributed.run's main), forked the same way, whose
workers start through the shim below.

What a module reads from the environment when it is imported (Hugging Face cache paths, thread counts, the
locale) is fixed in the server, so each server serves one such environment: `spawn` starts another server for
another one. Only modules that start no thread are loaded (pyarrow's jemalloc starts one, so `datasets` is
not): fork copies only the calling thread, and a lock held by another thread would be held forever in the child.

The shim: a forked child's `sys.executable` is a small script (written by the test process, see `shim`) that
forks `python SCRIPT ARGS` from the server for its environment when there is one, and execs the real python
otherwise. What a run of ours starts with sys.executable (torchrun's agent its workers, the search its trials)
starts in milliseconds too. The shim stands in for the child: it forwards every catchable signal to it and ends
as it ends (by the same signal, or with its exit code); the child is killed when the shim is, so killing the
worker torchrun knows ends the run it stands for.

Server: `python tests/forkserver.py SOCKET`, then one connection per child: the request (8-byte length, JSON
{argv: [SCRIPT, ARGS...] or ["-m", MODULE, ARGS...], env, cwd, new_session, watch}) with stdin, stdout and
stderr passed as file descriptors; the answer is the line "pid N", and "exit CODE" when the child has ended
(CODE as Popen gives it: -N for a signal). watch: a pid (the shim's) whose end kills the child.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
# The variables a preloaded module may read when it is imported (Hugging Face caches and offline switches, thread
# pools, allocators, locale, temporary and home directories): a request that differs in one goes to a server
# started with its values.
IMPORT_TIME_PREFIXES = (
    "HF_",
    "HUGGINGFACE",
    "TRANSFORMERS",
    "DATASETS",
    "TORCH",
    "PYTORCH",
    "OMP_",
    "MKL_",
    "KMP_",
    "CUDA",
    "NCCL",
    "GLOO",
    "TOKENIZERS",
    "RAYON",
    "XDG_",
    "PYTHON",
    "LANG",
    "LC_",
    "TMP",
    "TEMP",
    "HOME",
    "SAFETENSORS",
    "MALLOC",
)
# Read when the run starts, not at import: torchrun's attempt, run id and NCCL switches; the shim's own.
RUNTIME_PREFIXES = ("TORCHELASTIC_", "TORCH_NCCL_", "PYTHON_EXEC", "MLM_FORKSERVERS")
MAX_SERVERS = 4  # per test process; an environment beyond these runs in a fresh interpreter
# Where a test process's servers listen, one socket per import-time environment, so that the shim (below) finds
# the one for its environment. Children inherit it through their environment.
DIRECTORY_VARIABLE = "MLM_FORKSERVERS"


def import_key(env: dict) -> tuple:
    return tuple(
        sorted(
            (k, v) for k, v in env.items() if k.startswith(IMPORT_TIME_PREFIXES) and not k.startswith(RUNTIME_PREFIXES)
        )
    )


def socket_path(directory: str, env: dict) -> str:
    import hashlib

    return os.path.join(directory, hashlib.sha256(repr(import_key(env)).encode()).hexdigest()[:16] + ".sock")


# ---------------------------------------------------------------------------------------------------- server

SERVER_PATH = list(sys.path)  # sys.path as the interpreter set it, before preload adds the project root


def preload() -> None:
    """What every run imports, without datasets/pyarrow (see the module docstring)."""
    import numpy  # noqa: F401
    import safetensors.torch  # noqa: F401
    import tokenizers  # noqa: F401
    import torch  # noqa: F401
    import torch.distributed  # noqa: F401
    import torch.distributed.elastic.multiprocessing.errors  # noqa: F401
    import torch.distributed.run  # noqa: F401  (torchrun's agent)
    import transformers  # noqa: F401
    from transformers import modeling_utils, tokenization_utils_base  # noqa: F401
    from transformers.models.auto import modeling_auto, tokenization_auto  # noqa: F401
    from transformers.models.bert import modeling_bert, tokenization_bert  # noqa: F401

    sys.path.insert(0, ROOT)
    import predict  # noqa: F401
    import train_ddp  # noqa: F401
    from mlm import config  # noqa
    from mlm.data import cached, masking  # noqa
    from mlm.model import modeling  # noqa
    from mlm.report import card, tracking  # noqa
    from mlm.train import checkpoint, engine, finish, loop, runlock  # noqa

    threads = [t for t in os.listdir("/proc/self/task")]
    if len(threads) != 1:
        raise SystemExit(f"forkserver: the preloaded modules started {len(threads) - 1} thread(s); fork is unsafe")


def run_child(request: dict, fds: list[int]) -> None:
    """In the forked child: become `python SCRIPT ARGS` and never return."""
    import atexit
    import random
    import runpy
    import traceback

    code = 1
    try:
        if request.get("new_session"):
            os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        argv = list(request["argv"])
        random.seed()  # a new interpreter's state, not the server's
        if request.get("watch"):
            die_with(request["watch"])
        shim_path = os.path.join(os.environ.get(DIRECTORY_VARIABLE, ""), "python")
        if os.environ.get(DIRECTORY_VARIABLE) and os.path.isfile(shim_path):
            sys.executable = shim_path  # what this child starts as `python X.py` is forked too
        try:
            if argv[0] == "-m":  # python -m MODULE: the working directory first on the path, as python puts it
                sys.argv = argv[1:]
                sys.path[:] = [os.getcwd(), *SERVER_PATH[1:]]
                sys.modules.pop(argv[1], None)  # loaded by the server: run afresh as __main__, as python would
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = argv
                sys.path[:] = [os.path.dirname(os.path.abspath(argv[0])), *SERVER_PATH[1:]]
                runpy.run_path(argv[0], run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code & 0xFF
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        threading._shutdown()  # what the interpreter does at exit: join the non-daemon threads
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def die_with(pid: int) -> None:
    """SIGKILL this process when process pid (the shim that stands for it) ends."""
    import select
    import signal

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os.kill(os.getpid(), signal.SIGKILL)
        return

    def watch() -> None:
        select.select([fd], [], [])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="forkserver-watch").start()


def receive(conn: socket.socket) -> tuple[dict, list[int]]:
    header, fds, _, _ = socket.recv_fds(conn, 8, 3)
    (size,) = struct.unpack("!Q", header)
    payload = b""
    while len(payload) < size:
        chunk = conn.recv(size - len(payload))
        if not chunk:
            raise ConnectionError("request cut short")
        payload += chunk
    return json.loads(payload), list(fds)


def serve(path: str) -> None:
    import gc

    preload()
    # The preloaded modules' objects live as long as a child does: frozen, a child's full collections (one at
    # every run's teardown, 0.2 s over torch's and transformers' objects) skip them, and its pages stay shared.
    gc.collect()
    gc.freeze()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(sys.stdin, selectors.EVENT_READ)  # EOF: the test process is gone
    children: dict[int, socket.socket] = {}
    while True:
        for key, _ in selector.select(timeout=0.02):
            if key.fileobj is sys.stdin:
                if not sys.stdin.buffer.read1(1):
                    return
                continue
            conn, _ = listener.accept()
            conn.settimeout(10)  # a client that connects and sends nothing must not stop the server
            try:
                request, fds = receive(conn)
            except (ConnectionError, OSError, ValueError):
                conn.close()
                continue
            conn.settimeout(None)
            pid = os.fork()
            if pid == 0:
                listener.close()
                conn.close()
                for other in children.values():
                    other.close()
                run_child(request, fds)
            for fd in fds:
                os.close(fd)
            children[pid] = conn
            conn.sendall(f"pid {pid}\n".encode())
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
                except OSError:
                    pass
                conn.close()


# ---------------------------------------------------------------------------------------------------- client


class ForkedProcess:
    """The part of subprocess.Popen the tests use, for a child of a fork server: pid, poll, wait, signals and
    communicate (its output goes to unlinked temporary files, so no pipe fills up)."""

    def __init__(self, conn: socket.socket, stdout, stderr, argv: list[str]):
        self.args = argv
        self._conn, self._stdout, self._stderr = conn, stdout, stderr
        self._buffer = b""
        self.returncode: Optional[int] = None
        self.pid = int(self._line(timeout=60).split()[1])

    def _line(self, timeout: Optional[float]) -> str:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            self._conn.settimeout(left)
            try:
                chunk = self._conn.recv(4096)
            except (TimeoutError, BlockingIOError):
                raise subprocess.TimeoutExpired(self.args, timeout) from None
            if not chunk:
                raise RuntimeError("the fork server went away (see its log in the test's temporary directory)")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def wait(self, timeout: Optional[float] = None) -> int:
        if self.returncode is None:
            self.returncode = int(self._line(timeout).split()[1])
            self._conn.close()
        return self.returncode

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            try:
                self.wait(timeout=0)
            except subprocess.TimeoutExpired:
                return None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        import signal

        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: Optional[float] = None) -> tuple[str, str]:
        self.wait(timeout)
        return self._read(self._stdout), self._read(self._stderr)

    @staticmethod
    def _read(fh) -> str:
        """The whole output; a second call (as after Popen.communicate) gives it again."""
        if not hasattr(fh, "text"):
            fh.seek(0)
            fh.text = fh.read().decode("utf-8", errors="replace")
        return fh.text


class _Server:
    def __init__(self, env: dict):
        self.dir = tempfile.mkdtemp(prefix="mlm-forkserver-")
        self.path = socket_path(directory(), env)
        self.log = open(os.path.join(self.dir, "server.log"), "w+b")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), self.path],
            env=env,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
        )
        self.ready = False

    def wait_ready(self) -> None:
        if self.ready:
            return
        line = self.proc.stdout.readline()  # the server prints "ready" once it listens, or dies
        if line.strip() != b"ready":
            self.log.seek(0)
            raise RuntimeError(f"the fork server did not start: {self.log.read().decode()[-3000:]}")
        self.ready = True

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # EOF: it returns; its children run on until they end
            self.proc.wait(10)
        except Exception:
            self.proc.kill()


_servers: dict[tuple, _Server] = {}
_servers_lock = threading.Lock()
_directory: Optional[str] = None

SHIM = """#!{python} -IS
import sys
sys.path.insert(0, {tests!r})
from forkserver import shim
shim(sys.argv[1:])
"""


def directory() -> str:
    """This test process's server directory, with the shim in it as `python` (made on first use)."""
    global _directory
    if _directory is None:
        d = tempfile.mkdtemp(prefix="mlm-fs-")
        path = os.path.join(d, "python")
        with open(path, "w") as fh:
            fh.write(SHIM.format(python=sys.executable, tests=TESTS))
        os.chmod(path, 0o755)
        _directory = d
    return _directory


def server_for(env: dict) -> Optional[_Server]:
    key = import_key(env)
    with _servers_lock:
        if key not in _servers:
            if len(_servers) >= MAX_SERVERS:
                return None
            _servers[key] = _Server(env)
        server = _servers[key]
    server.wait_ready()
    return server


def prestart(env: dict) -> None:
    """Start the server for env in the background (its imports overlap whatever the caller does next)."""
    with _servers_lock:
        key = import_key(env)
        if key not in _servers:
            _servers[key] = _Server(env)


def close_all() -> None:
    with _servers_lock:
        for server in _servers.values():
            server.close()
        _servers.clear()
        if _directory is not None:
            import shutil

            shutil.rmtree(_directory, ignore_errors=True)


def spawn(argv: list[str], env: dict, cwd: str, stdin: Optional[str] = None, new_session: bool = False):
    """`python argv...` as a child of a fork server (a ForkedProcess), or as a fresh interpreter (a Popen with
    the same interface) when argv is neither a script nor `-m mlm.X`, or no server holds env's import-time
    variables."""
    env = {k: os.fspath(v) for k, v in env.items()}
    env[DIRECTORY_VARIABLE] = directory()
    argv = [os.fspath(a) if isinstance(a, os.PathLike) else a for a in argv]
    server = server_for(env) if forkable(argv) else None
    stdout, stderr = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    stdin_file = tempfile.TemporaryFile()
    if stdin is not None:
        stdin_file.write(stdin.encode())
        stdin_file.seek(0)
    if server is None:
        p = subprocess.Popen(
            [sys.executable, *argv],
            env=env,
            cwd=cwd,
            stdin=stdin_file,
            stdout=stdout,
            stderr=stderr,
            start_new_session=new_session,
        )
        stdin_file.close()
        return _PopenToFiles(p, stdout, stderr)
    conn = request(
        server.path,
        {"argv": argv, "env": env, "cwd": os.fspath(cwd), "new_session": new_session},
        [stdin_file.fileno(), stdout.fileno(), stderr.fileno()],
    )
    stdin_file.close()
    return ForkedProcess(conn, stdout, stderr, argv)


def forkable(argv: list[str]) -> bool:
    """A script, `-m mlm.X`, or torchrun's agent: what the server runs (anything else: a fresh interpreter)."""
    if len(argv) >= 2 and argv[0] == "-m":
        return argv[1].startswith("mlm.") or argv[1] == "torch.distributed.run"
    return bool(argv) and argv[0].endswith(".py") and os.path.isfile(argv[0])


def python_args(cmd: list[str]) -> Optional[list[str]]:
    """What follows `python` in a command line the server can run: `python ARGS` with ARGS forkable, or the
    torchrun console script (torch.distributed.run's main); None for any other command."""
    if cmd and os.path.basename(cmd[0]) == "torchrun":
        return ["-m", "torch.distributed.run", *cmd[1:]]
    if cmd and cmd[0] == sys.executable and forkable(cmd[1:]):
        return cmd[1:]
    return None


def request(path: str, what: dict, fds: list[int]) -> socket.socket:
    """Ask the server at path for a child; the connection, on which "pid N" and "exit CODE" come."""
    payload = json.dumps(what).encode()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    socket.send_fds(conn, [struct.pack("!Q", len(payload))], fds)
    conn.sendall(payload)
    return conn


# ------------------------------------------------------------------------------------------------------ shim


def shim(args: list[str]) -> None:
    """`python ARGS` for a child of a forked run: forked from this test process's server for this environment,
    or, where there is none (or ARGS is not a script of ours), the real python in this process's place."""
    import signal

    flags = []
    while args[:1] == ["-u"]:  # torchrun starts its workers with -u
        flags.append(args.pop(0))
    env = dict(os.environ)
    if flags:
        env["PYTHONUNBUFFERED"] = "1"
    path = socket_path(env.get(DIRECTORY_VARIABLE, ""), env)
    conn = None
    if forkable(args) and os.path.exists(path):
        try:
            conn = request(path, {"argv": args, "env": env, "cwd": os.getcwd(), "watch": os.getpid()}, [0, 1, 2])
        except OSError:
            conn = None  # the server is gone (its test process ended)
    if conn is None:
        os.execv(sys.executable, [sys.executable, *flags, *args])
    reader = conn.makefile("rb")
    line = reader.readline().split()
    if not line or line[0] != b"pid":
        os._exit(1)
    child = int(line[1])

    def forward(signum, frame) -> None:
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for signum in set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD}:
        try:
            signal.signal(signum, forward)
        except (OSError, ValueError):
            pass
    line = reader.readline().split()
    code = int(line[1]) if len(line) == 2 and line[0] == b"exit" else 1
    if code < 0:  # ended by a signal: so does the shim, as the process it stands for did
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        code = 128 - code
    os._exit(code & 0xFF)


class _PopenToFiles:
    """A Popen whose output went to temporary files, with ForkedProcess's communicate."""

    def __init__(self, p: subprocess.Popen, stdout, stderr):
        self._p, self._stdout, self._stderr = p, stdout, stderr
        self.pid, self.args = p.pid, p.args

    @property
    def returncode(self) -> Optional[int]:
        return self._p.returncode

    def poll(self):
        return self._p.poll()

    def wait(self, timeout=None):
        return self._p.wait(timeout)

    def send_signal(self, sig):
        if self._p.poll() is None:
            self._p.send_signal(sig)

    def terminate(self):
        self._p.terminate()

    def kill(self):
        self._p.kill()

    def communicate(self, timeout=None):
        self._p.wait(timeout)
        return ForkedProcess._read(self._stdout), ForkedProcess._read(self._stderr)


if __name__ == "__main__":
    serve(sys.argv[1])
