"""A real worker's steps, read back from a ``bench compare`` run's token times.

A worker steps every sequence it holds at once: a step ends with one token for each sequence it
decodes and the first token of each prompt it finished. The client's record of a request (its
``sent_at_s`` and each chunk's time since then) therefore shows its worker's step ends as
clusters of token times a few ms apart (the router's relay, the client's loop), where steps are
tens of ms apart or more. Between two consecutive clusters that share a sequence the worker
stepped without pause, so the gap between their first tokens is one step's time, and the later
cluster says what that step held: the sequences that got a token past their first (decodes, at
their context) and the prompts that got their first.

A step is kept only when that is all it held, as far as the records can tell:

- every chunk in it is one token (a relay that merged two steps' tokens hides a boundary);
- each sequence alive on the worker across the step (a token before it and one after) has a
  token in it — one missing was preempted (its recompute is a prefill the tokens do not show)
  or the clustering split the step;
- each prompt that finished in it reached the worker (sent + the router's ``routing_s``) while
  the step before ran, and no prompt that had reached the worker finished later — otherwise
  part of some prompt was computed in another step (the token budget cuts prompts into chunks)
  or it waited for memory, and the step's prompt work is not known.

``sim serving --colocated-apart`` fits a colocated worker's costs on these steps
(``serving.py``, ``fit_mixed_steps``): the time model's step prediction against the measured step, rather than a
request's TTFT, which also holds the relay of its first token and its queueing.

A PD decode worker's steps are read the same way from every token after a request's first
(``decode_worker_steps``), each marked by whether a prefill worker was computing a prompt bound
for that decode worker meanwhile: on this machine such a step ran 1.14-1.15x one without
(docs/simulator.md, session 20), which ``sim serving`` fits as ``receiving_scale``.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass

# Token times of one step end less than this apart (on the client's clock) are one cluster; the
# relay spreads them over a few ms where steps on this machine are >= 50 ms apart.
JOIN_S = 0.02


@dataclass(frozen=True)
class StepPoint:
    """One real step: its decodes and their total context, its prompts' uncached tokens and
    attention work (tokens x context, as the simulator counts it), and its measured seconds."""

    num_decodes: int
    context: int
    prompt_tokens: int
    attention_work: int
    seconds: float


@dataclass(frozen=True)
class _Token:
    t: float  # absolute, on the client's clock
    seq: int  # index into the worker's requests
    index: int  # output tokens before this one


def _requests_by_worker(run: dict) -> dict[str, list[dict]]:
    by: dict[str, list[dict]] = {}
    for q in run.get("requests", []):
        server = q.get("server") or {}
        if q.get("status") == "OK" and q.get("chunks") and server.get("prefill_worker"):
            by.setdefault(server["prefill_worker"], []).append(q)
    return by


def _tokens(qs: list[dict]) -> tuple[list[_Token], list[float]]:
    """The worker's tokens in time order, and the times of its chunks of more than one."""
    tokens, merged = [], []
    for i, q in enumerate(qs):
        index = 0
        for t, n in q["chunks"]:
            tokens.append(_Token(q["sent_at_s"] + t, i, index))
            if n != 1:
                merged.append(q["sent_at_s"] + t)
            index += n
    tokens.sort(key=lambda k: k.t)
    return tokens, sorted(merged)


def _clusters(tokens: list[_Token], join_s: float) -> list[list[_Token]]:
    clusters: list[list[_Token]] = []
    for k in tokens:
        current = clusters[-1] if clusters else None
        if current and k.t - current[-1].t < join_s and all(o.seq != k.seq for o in current):
            current.append(k)
        else:
            clusters.append([k])
    return clusters


@dataclass(frozen=True)
class _Worker:
    qs: list[dict]
    arrival: list[float]  # sent + the router's routing_s: when the worker had the prompt
    first: list[float]
    last: list[float]
    merged: list[float]


def worker_steps(run: dict, join_s: float = JOIN_S) -> list[StepPoint]:
    """The steps of every worker of one ``bench compare`` run (a ``runs`` entry) whose time and
    contents its token records pin down (module docstring)."""
    points = []
    for qs in _requests_by_worker(run).values():
        tokens, merged = _tokens(qs)
        w = _Worker(
            qs,
            [q["sent_at_s"] + (q["server"].get("routing_s") or 0.0) for q in qs],
            [q["sent_at_s"] + q["chunks"][0][0] for q in qs],
            [q["sent_at_s"] + q["chunks"][-1][0] for q in qs],
            merged,
        )
        clusters = _clusters(tokens, join_s)
        for k in range(1, len(clusters)):
            before = clusters[k - 2][0].t if k > 1 else None
            point = _step(w, clusters[k - 1], clusters[k], before, join_s)
            if point is not None:
                points.append(point)
    return points


def _step(w: _Worker, prev: list[_Token], cur: list[_Token], before: float | None,
          join_s: float) -> StepPoint | None:  # fmt: skip
    """The step that ``cur`` ended (``prev`` ended the one before it, ``before`` the one
    before that), or None when the records do not pin it down."""
    start, end = prev[0].t, cur[0].t
    in_cur = {k.seq for k in cur}
    if not in_cur & {k.seq for k in prev}:
        return None  # the worker may have paused between the two
    i = bisect.bisect_left(w.merged, start - join_s)
    if i < len(w.merged) and w.merged[i] < end + join_s:
        return None  # a chunk of several tokens near the step: a merged boundary
    for i in range(len(w.qs)):
        if i not in in_cur and w.first[i] < start + join_s and w.last[i] > end + join_s:
            return None  # alive across the step without a token in it
        if w.arrival[i] < start and w.first[i] > end + join_s:
            return None  # a prompt the worker had, still unfinished after the step
    decodes = context = tokens = attention = 0
    for k in cur:
        q = w.qs[k.seq]
        if k.index > 0:
            decodes += 1
            context += q["num_prompt_tokens"] + k.index
            continue
        if (before is not None and w.arrival[k.seq] <= before) or w.arrival[k.seq] > start:
            return None  # may have had a chunk in an earlier step, or came after this one began
        cached = q["server"].get("num_cached_tokens") or 0
        n = q["num_prompt_tokens"] - cached
        tokens += n
        attention += n * q["num_prompt_tokens"]
    return StepPoint(decodes, context, tokens, attention, end - start)


@dataclass(frozen=True)
class DecodeStep:
    """One real step of a PD decode worker: its decodes, their total context, its measured
    seconds, and whether a prefill worker computed a prompt bound for it meanwhile (for at
    least half the step: the prompt's KV streamed in layer by layer as it computed)."""

    num_decodes: int
    context: int
    seconds: float
    receiving: bool


def decode_worker_steps(
    run: dict, one_decode_worker: bool, join_s: float = JOIN_S
) -> list[DecodeStep]:
    """The steps of a PD run's decode workers that its token records pin down: as
    ``worker_steps`` reads a colocated worker's, over every token after the first (the first is
    the prefill worker's), keeping only steps of decodes that every sequence alive across them
    has a token in, and none that a sequence joined (its hand-off may have ended mid-step).
    A request records its decode worker (``server.decode_worker``); runs from before it did
    count when ``one_decode_worker`` (the cluster had one), else they are skipped."""
    by: dict[str | None, list[dict]] = {}
    for q in run.get("requests", []):
        server = q.get("server") or {}
        if q.get("status") != "OK" or len(q.get("chunks") or ()) < 2 or not server.get("prefill_s"):
            continue  # no decode step of its own, or prefilled where it decodes (no hand-off)
        worker = server.get("decode_worker")
        if worker is None and not one_decode_worker:
            continue
        by.setdefault(worker, []).append(q)
    points = []
    for qs in by.values():
        points.extend(_decode_steps(qs, join_s))
    return points


def _decode_steps(qs: list[dict], join_s: float) -> list[DecodeStep]:
    tokens, merged = [], []
    first, last, computing = {}, {}, []
    for i, q in enumerate(qs):
        index = 0
        for t, n in q["chunks"]:
            if index >= 1:
                tokens.append(_Token(q["sent_at_s"] + t, i, index))
                if n != 1:
                    merged.append(q["sent_at_s"] + t)
            index += n
        first[i] = q["sent_at_s"] + q["chunks"][1][0]
        last[i] = q["sent_at_s"] + q["chunks"][-1][0]
        ttft = q["sent_at_s"] + q["chunks"][0][0]
        computing.append((ttft - q["server"]["prefill_s"], ttft))
    tokens.sort(key=lambda k: k.t)
    merged.sort()
    clusters = _clusters(tokens, join_s)
    points = []
    for prev, cur in itertools.pairwise(clusters):
        start, end = prev[0].t, cur[0].t
        in_cur = {k.seq for k in cur}
        if not in_cur & {k.seq for k in prev} or any(k.index == 1 for k in cur):
            continue  # a pause between them, or a sequence that joined during the step
        i = bisect.bisect_left(merged, start - join_s)
        if i < len(merged) and merged[i] < end + join_s:
            continue  # a chunk of several tokens near the step: a merged boundary
        if any(i not in in_cur and first[i] < start + join_s and last[i] > end + join_s
               for i in first):  # fmt: skip
            continue  # alive across the step without a token in it
        overlap = sum(max(0.0, min(end, e) - max(start, s)) for s, e in computing)
        context = sum(qs[k.seq]["num_prompt_tokens"] + k.index for k in cur)
        points.append(DecodeStep(len(cur), context, end - start, overlap >= 0.5 * (end - start)))
    return points
