"""A local bsce-serve stack: the learner worker and ``bentoml serve`` as child processes.

Used by the demo, the serving benchmark and the tests, which all need the same thing: start
both against one Redis and model store, wait until the API answers, stop both at the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]


class StackError(RuntimeError):
    """A process of the stack exited, or the API did not become ready in time."""


@dataclass(frozen=True)
class Stack:
    url: str
    procs: Mapping[str, subprocess.Popen[bytes]]
    logs: Mapping[str, Path]  # empty when the processes write to our own stdout

    def log_tail(self, chars: int = 4000) -> str:
        return "\n".join(
            f"--- {name} ---\n" + path.read_text(errors="replace")[-chars:]
            for name, path in self.logs.items()
        )


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    """SIGTERM the process group (started with start_new_session), SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


def _wait_ready(stack: Stack, workers: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    ready = 0
    # Several ready answers in a row, as each may come from a different API worker.
    while ready < 2 * workers:
        for name, proc in stack.procs.items():
            if proc.poll() is not None:
                raise StackError(f"{name} exited with {proc.returncode}\n{stack.log_tail()}")
        if time.monotonic() > deadline:
            raise StackError(
                f"the server was not ready within {timeout_s:.0f} s\n{stack.log_tail()}"
            )
        try:
            ready = ready + 1 if requests.get(stack.url + "/readyz", timeout=10).ok else 0
        except requests.RequestException:  # not listening yet, or busy starting
            ready = 0
        time.sleep(0.2)


@contextmanager
def local_stack(
    env: Mapping[str, str],
    port: int,
    worker_args: Sequence[str] = (),
    *,
    log_dir: Path | None = None,
    quiet: bool = False,
    ready_timeout_s: float = 180.0,
) -> Iterator[Stack]:
    """Start ``python -m learner.worker WORKER_ARGS`` and ``bentoml serve`` on ``port`` with
    ``env``; yield once the API is ready; stop both on exit.

    Output goes to ``log_dir/{worker,server}.log`` when given, nowhere with ``quiet``, else to
    our own stdout. The number of API workers is ``env["BSCE_WORKERS"]`` (default 2).
    """
    commands = {
        "worker": [sys.executable, "-m", "learner.worker", *worker_args],
        "server": [
            str(Path(sys.executable).parent / "bentoml"), "serve", "server.service:BsceServe",
            "--host", "127.0.0.1", "--port", str(port),
        ],
    }  # fmt: skip
    logs = {name: log_dir / f"{name}.log" for name in commands} if log_dir is not None else {}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    with ExitStack() as files:
        try:
            for name, cmd in commands.items():
                out = files.enter_context(open(logs[name], "wb")) if logs else None
                procs[name] = subprocess.Popen(
                    cmd,
                    cwd=REPO,
                    env=dict(env),
                    stdout=subprocess.DEVNULL if quiet else out,
                    stderr=subprocess.DEVNULL if quiet else (subprocess.STDOUT if out else None),
                    # Own process groups: a Ctrl-C reaches the caller, who stops them in order.
                    start_new_session=True,
                )
            stack = Stack(f"http://127.0.0.1:{port}", procs, logs)
            _wait_ready(stack, int(env.get("BSCE_WORKERS", "2")), ready_timeout_s)
            yield stack
        finally:
            for proc in reversed(list(procs.values())):
                stop_process(proc)
