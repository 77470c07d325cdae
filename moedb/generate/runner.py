"""Running many generation requests: concurrently across backends, grouped per adapter.

Requests whose generators share a local model (same :meth:`Generator.group_key`) run one after the
other in one worker thread, ordered so that all requests for one adapter are contiguous (each
adapter is activated once per batch). Different groups (other models, remote servers) run
concurrently. A failure is returned in place of its result, never raised.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Union

from .base import GenerationError, Generation, GenRequest, Generator

Outcome = Union[Generation, GenerationError]


def _run_one(gen: Generator, req: GenRequest) -> Outcome:
    try:
        return gen.generate(req)
    except GenerationError as e:
        return e
    except Exception as e:  # a backend bug must not take the whole answer down
        return GenerationError(f"{gen.describe()}: {type(e).__name__}: {e}", retryable=False)


def plan_groups(jobs: list[tuple[Generator, GenRequest]]) -> list[list[int]]:
    """Indices of ``jobs`` grouped by shared model, each group ordered by adapter (first use first)."""
    groups: dict[tuple, list[int]] = {}
    for i, (gen, _) in enumerate(jobs):
        groups.setdefault(gen.group_key(), []).append(i)
    out = []
    for idx in groups.values():
        first: dict[str, int] = {}
        for i in idx:
            first.setdefault(jobs[i][0].adapter_key(), len(first))
        out.append(sorted(idx, key=lambda i: (first[jobs[i][0].adapter_key()], i)))
    return out


def run_batch(jobs: list[tuple[Generator, GenRequest]], parallel: bool = True, max_workers: int = 8) -> list[Outcome]:
    """Outcomes in the order of ``jobs``: a :class:`Generation` or the :class:`GenerationError`."""
    results: list = [None] * len(jobs)
    groups = plan_groups(jobs)

    def work(idx: list[int]) -> None:
        for i in idx:
            results[i] = _run_one(*jobs[i])

    if not parallel or len(groups) <= 1:
        for g in groups:
            work(g)
    else:
        with ThreadPoolExecutor(max_workers=min(max_workers, len(groups)), thread_name_prefix="moedb-gen") as ex:
            list(ex.map(work, groups))
    return results
