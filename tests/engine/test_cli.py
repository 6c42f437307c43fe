"""``banaserve`` as a user runs it: real subprocesses, stdout/stderr contract."""

from __future__ import annotations

import os
import subprocess
import sys

from services.common.types import SamplingParams
from tests.engine.helpers import make_engine


def banaserve(home, *args, timeout=120):
    env = {**os.environ, "BANASERVE_HOME": str(home), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def test_generate_streams_only_the_completion_to_stdout(banaserve_home, tiny_llama):
    prompt = "Return the value of"
    run = banaserve(
        banaserve_home,
        "generate",
        "--model",
        "tiny-llama",
        "--prompt",
        prompt,
        "--max-tokens",
        "12",
        "--ignore-eos",
        "--threads",
        "1",
    )
    assert run.returncode == 0, run.stderr
    [expected] = make_engine(tiny_llama).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    )
    assert run.stdout == expected.text + "\n"
    assert "12 tokens" in run.stderr and "finish=length" in run.stderr


def test_generate_chat_with_sampling_flags(banaserve_home, tiny_llama):
    args = (
        "generate",
        "--model",
        str(tiny_llama),
        "--prompt",
        "Hi",
        "--chat",
        "--temperature",
        "0.7",
        "--top-p",
        "0.9",
        "--seed",
        "3",
        "--max-tokens",
        "6",
        "--dtype",
        "bfloat16",
    )
    first, second = banaserve(banaserve_home, *args), banaserve(banaserve_home, *args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout  # seeded: reproducible across processes


def test_errors_are_one_clear_line_and_exit_2(banaserve_home):
    run = banaserve(banaserve_home, "generate", "--model", "nope", "--prompt", "x")
    assert run.returncode == 2 and run.stdout == ""
    assert "banaserve: error:" in run.stderr and "nope" in run.stderr
    run = banaserve(
        banaserve_home, "generate", "--model", "tiny-llama", "--prompt", "x", "--top-p", "2"
    )
    assert run.returncode == 2 and "top_p must be in (0, 1]" in run.stderr


def test_models_prepare_prints_name_and_path(banaserve_home, tiny_llama):
    run = banaserve(banaserve_home, "models", "prepare", "tiny-llama")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["tiny-llama", str(tiny_llama)]
