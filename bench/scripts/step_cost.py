"""Decode step cost of the engine in the current directory's tree (docs/engine.md, the costs).

    cd TREE && PYTHONPATH=TREE python bench/scripts/step_cost.py same 30

smollm2-135m bfloat16, 16 sequences of 32 random tokens, 4 warm-up steps, then STEPS decode
steps; prints one JSON line: median CPU (thread) ms and wall ms per step, and the fastest step.
``same`` switches this tree's C++ kernels off (torch decode attention, oneDNN linears), so an
older tree without them computes the same way; ``kernels`` leaves them on. Run it for two trees
in turn (old, new, old, new, ...) and compare medians: interleaving spreads a shared machine's
load over both.
"""

import json
import random
import statistics
import sys
import time

import torch

same_compute = sys.argv[1] == "same"
steps = int(sys.argv[2])
if same_compute:
    try:
        from services.engine import paged_decode
        from services.engine.models import packed_linear

        paged_decode.supports = lambda q, k: False
        if hasattr(packed_linear, "native_bf16"):
            packed_linear.native_bf16 = lambda: True
    except ImportError:  # a tree from before the kernels
        pass
from services.common.config import EngineConfig  # noqa: E402
from services.common.types import SamplingParams  # noqa: E402
from services.engine.engine import Engine  # noqa: E402

torch.set_num_threads(1)
engine = Engine(
    EngineConfig(
        model="smollm2-135m",
        dtype="bfloat16",
        num_threads=1,
        enable_prefix_caching=False,
        max_num_seqs=64,
    )
)
rng = random.Random(0)
params = SamplingParams(temperature=0.0, max_tokens=steps + 20, ignore_eos=True, detokenize=False)
for i in range(16):
    engine.add_request(f"r{i}", [rng.randrange(100, 40000) for _ in range(32)], params)
for _ in range(4):
    engine.step()
cpu, wall = [], []
for _ in range(steps):
    c, w = time.thread_time(), time.perf_counter()
    engine.step()
    cpu.append(time.thread_time() - c)
    wall.append(time.perf_counter() - w)
print(
    json.dumps(
        {
            "cpu_ms": statistics.median(cpu) * 1e3,
            "wall_ms": statistics.median(wall) * 1e3,
            "cpu_min_ms": min(cpu) * 1e3,
        }
    )
)
