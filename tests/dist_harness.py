"""Run a function in N CPU processes joined by a gloo process group, from inside pytest.

``run_ranks(fn, world_size, *args, timeout=...)`` starts ``world_size`` processes (``fork`` by
default: ~0.1 s instead of ~1.5 s with ``spawn``, valid as long as the pytest process itself
never creates a process group or an ``Accelerator``), each initialising gloo over
``tcp://127.0.0.1:<free port>`` with a short process-group timeout, runs ``fn(rank, world,
*args)`` and sends its result back pickled to bytes. The parent waits at most ``timeout``
seconds: a rank that hangs (mismatched collectives) or dies makes the call raise
:class:`DistributedRunError`, which fails the test; the children are then killed.

Success is judged by the results received, not by exit codes: gloo processes sometimes abort
at interpreter exit ("terminate called without an active exception") after all work is done.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

__all__ = ["DistributedRunError", "free_port", "run_ranks"]


class DistributedRunError(AssertionError):
    """A rank raised, crashed, or did not answer before the timeout."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(rank: int, world: int, port: int, pg_timeout: float, fn: Callable[..., Any], args: tuple, queue: Any) -> None:
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )
        out = fn(rank, world, *args)
        payload = (rank, "ok", pickle.dumps(out))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        payload = (rank, "error", traceback.format_exc())
    queue.put(payload)
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - teardown after the result was sent
        pass


def run_ranks(
    fn: Callable[..., Any],
    world_size: int = 2,
    *args: Any,
    timeout: float = 60.0,
    pg_timeout: float = 30.0,
    start_method: str | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on every rank; return the results in rank order.

    ``fn`` must be a module-level function (picklable). Raises :class:`DistributedRunError` if a
    rank raised (its traceback is included), crashed, or no result came within ``timeout`` s.
    """
    method = start_method or os.environ.get("BALANCEDMIX_DIST_START", "fork")
    ctx = mp.get_context(method)
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(r, world_size, port, pg_timeout, fn, args, queue), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    dead_since: float | None = None
    while len(results) < world_size and time.monotonic() < deadline:
        if not queue.empty():
            rank, status, payload = queue.get()
            results[rank] = (status, payload)
            continue
        if any(not p.is_alive() for p in procs):
            # a rank died: give the queue a moment for results already sent, then stop waiting
            dead_since = dead_since or time.monotonic()
            if time.monotonic() - dead_since > 2.0 and all(not p.is_alive() for p in procs):
                break
            if time.monotonic() - dead_since > 10.0:
                break
        time.sleep(0.01)
    complete = len(results) == world_size
    for p in procs:
        p.join(timeout=5.0 if complete else 0.2)
        if p.is_alive():
            p.kill()
            p.join()
    errors = {r: v[1] for r, v in results.items() if v[0] == "error"}
    missing = sorted(set(range(world_size)) - set(results))
    if errors or missing:
        detail = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise DistributedRunError(
            f"distributed run failed: ranks with errors {sorted(errors)}, ranks without a result {missing} "
            f"(hang, deadlock or crash; timeout {timeout} s)\n{detail}"
        )
    return [pickle.loads(results[r][1]) for r in range(world_size)]
