"""Interleaved runs of ``banaserve bench engine`` (the default; ``--no-interleave`` is off).

Every system of a dtype is started at once (``Runner``: ``python -m bench.engine_runners ...
--reply-fd N``); once all have loaded their model, call ``i`` of the plan runs on each of them
in turn, the first system rotating with ``i``, each runner answering one line per call on its
reply pipe. On a shared machine a burst of load then falls on every system alike rather than
on whichever happened to run during it. At the end each runner's stdin is closed; it writes
its result JSON (the same as a sequential run's) and exits, and whatever is left of its
process group (a vLLM engine-core process) is killed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import subprocess
import time
from pathlib import Path

from bench.engine_bench import REPO_ROOT, interpreter, runner_env, tail, vllm_cpu_bind
from bench.engine_report import run_key


class Runner:
    """One system's runner process in interleaved mode: call indices in, one reply line out."""

    def __init__(
        self, system: str, dtype: str, args: argparse.Namespace, paths: dict[str, Path]
    ) -> None:
        self.system, self.dtype, self.error = system, dtype, ""
        self.result_path = paths["out"] / "logs" / f"{system}-{dtype}.json"
        self.log_path = paths["out"] / "logs" / f"{system}-{dtype}.log"
        self.result_path.unlink(missing_ok=True)
        self.python, reason, self.preload = interpreter(system, args)
        self.proc: subprocess.Popen[str] | None = None
        if self.python is None:
            self.error = reason
            return
        read_end, write_end = os.pipe()
        cmd = [
            self.python, "-m", "bench.engine_runners", system, "--model", str(paths["model"]),
            "--dtype", dtype, "--threads", str(args.threads), "--plan", str(paths["plan"]),
            "--json-out", str(self.result_path), "--reply-fd", str(write_end),
            "--cpus", vllm_cpu_bind(args.threads, args.first_cpu),
        ]  # fmt: skip
        env = runner_env(system, args.threads, os.environ, self.preload, args.first_cpu)
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE,
                                         stdout=log, stderr=subprocess.STDOUT, text=True,
                                         pass_fds=(write_end,), start_new_session=True)  # fmt: skip
        os.close(write_end)
        self.replies = os.fdopen(read_end)

    @property
    def alive(self) -> bool:
        return self.proc is not None and not self.error

    def reply(self, deadline: float) -> dict | None:
        """The next reply line, or None (and an error) if the runner died or ran out of time."""
        ready, _, _ = select.select([self.replies], [], [], max(0.0, deadline - time.monotonic()))
        line = self.replies.readline() if ready else ""
        if not line:
            self.error = "timed out" if not ready else "exited"
            self.error = f"runner {self.error} (log: {self.log_path})\n{tail(self.log_path)}"
            return None
        return json.loads(line)

    def run(self, index: int, deadline: float) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(f"{index}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.error = f"runner exited (log: {self.log_path})\n{tail(self.log_path)}"
            return
        self.reply(deadline)

    def finish(self, deadline: float) -> dict:
        result: dict = {"error": self.error} if self.error else {}
        if self.proc is not None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()  # type: ignore[union-attr]
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):  # a stray vLLM engine-core process
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.replies.close()
            if not self.error and self.result_path.is_file():
                result = json.loads(self.result_path.read_text())
            elif not self.error:
                result = {"error": f"runner exited without a result:\n{tail(self.log_path)}"}
            result["python"] = self.python
            if self.preload:
                result["ld_preload"] = self.preload
        return {**result, "system": self.system, "dtype": self.dtype}


def run_interleaved(
    dtype: str, num_calls: int, args: argparse.Namespace, paths: dict[str, Path]
) -> dict[str, dict]:
    """Every system of ``dtype`` loaded at once, then call ``i`` on each in turn (the first
    system rotating from call to call), so load on a shared machine falls on all alike."""
    deadline = time.monotonic() + args.timeout * len(args.systems)
    runners = [Runner(system, dtype, args, paths) for system in args.systems]
    for r in runners:
        if r.alive:
            r.reply(deadline)  # {"ready": true} once the model is loaded
    for index in range(num_calls):
        turn = runners[index % len(runners) :] + runners[: index % len(runners)]
        for r in turn:
            if r.alive:
                r.run(index, deadline)
    return {run_key(r.system, dtype): r.finish(deadline) for r in runners}
