"""A prefill donor's step by number of micro-batches (docs/migration.md, "What does not work yet").

    PYTHONPATH=. .venv/bin/python bench/scripts/mb_prefill.py [K] [PROMPTS] [LENGTH] [MODEL_DIR]

Two smollm2-135m float32 engines in one process, one torch thread each: the donor runs layers
``[0, K)`` (default 15) and the helper, on its own thread behind a ``LocalStagePort``, layers
``[K, L)``. Each round adds PROMPTS (8) prompts of LENGTH (256) random tokens and times the
hooked prefill
step that computes them (a prefill worker's steps hand KV on layer by layer; at most 2,048
tokens a step: more make several steps, all timed), locally and
split into 2, 4 and 8 micro-batches; 4 rounds, the first a warm-up. Prints the median step,
prompt tokens a second and the ratio to the local step.
"""

import random
import statistics
import sys
import time
from pathlib import Path

import torch

from services.common.config import EngineConfig
from services.common.types import SamplingParams
from services.engine.engine import Engine
from services.engine.local_ports import LocalStagePort
from services.engine.stages import StageLayout

ROUNDS = 4


def main() -> None:
    torch.set_num_threads(1)
    args = sys.argv[1:]
    k = int(args[0]) if args else 15
    num_prompts = int(args[1]) if len(args) > 1 else 8
    prompt_len = int(args[2]) if len(args) > 2 else 256
    default_model = Path.home() / ".cache/banaserve/models/smollm2-135m"
    model = args[3] if len(args) > 3 else str(default_model)
    config = EngineConfig(model=model, num_kv_blocks=1024, max_num_batched_tokens=2048)
    donor, helper = Engine(config), Engine(config)
    layers = donor.spec.num_layers
    port = LocalStagePort(helper.migration.host_layers("A", k, layers, 1024, donor.fingerprint))
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    rng = random.Random(0)

    def hook(layer: int, ctx: object) -> None:  # a prefill worker's KV sender, doing nothing
        pass

    def step(micro: int, round_: int) -> float:
        layout = (
            StageLayout.split(layers, k, port, num_micro_batches=micro)
            if micro
            else StageLayout.local(layers)
        )
        donor.migration.set_stages(layout)
        for i in range(num_prompts):
            prompt = [rng.randrange(1000, 30000) for _ in range(prompt_len)]
            donor.add_request(f"{micro}-{round_}-{i}", prompt, params)
        t0 = time.perf_counter()
        while donor.has_unfinished_requests:  # the prefill steps, then one decode step
            donor.step(hook)
        return time.perf_counter() - t0

    times: dict[int, list[float]] = {}
    for round_ in range(ROUNDS):
        for micro in (0, 2, 4, 8):
            times.setdefault(micro, []).append(step(micro, round_))
    local = statistics.median(times[0][1:])
    for micro, ts in times.items():
        median = statistics.median(ts[1:])
        print(
            f"k={k} micro-batches={micro or 'local'}: step {median * 1e3:.0f} ms "
            f"(rounds {[round(t * 1e3) for t in ts]}), "
            f"{num_prompts * prompt_len / median:.0f} prompt tok/s, x{local / median:.2f}"
        )
    port.close()


if __name__ == "__main__":
    main()
