"""featurize's worker pool: the calling process plus `jobs - 1` forked workers take chunk
tasks from one shared counter.

Why not concurrent.futures.ProcessPoolExecutor (issue 13 asked for it, within 5% of this
pool's --jobs 2 throughput): a fork-context executor whose worker takes chunks from the same
shared counter, with the parent computing too, was run with examples/bench_featurize.py on
FSDD (3,000 files, --jobs 2), 14 rounds interleaved with this pool on the shared 2-core
machine (Dec 2026). Its parent did ~62% of the work (CPU 0.20-0.24 s against 0.12-0.14 s in
its worker) where this pool's does ~53% (0.17-0.18 s against 0.15-0.16 s): the executor's
feeder and manager threads and the result pickling run in the parent, which is also the only
writer of the store. On two free cores a run lasts about as long as the parent's share, so
the executor costs ~15% (best wall in the rounds at load 4-5: 0.345 s against 0.294 s), more
than the 5% allowed: this pool stays.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from typing import Any, Callable

log = logging.getLogger(__name__)

Work = Callable[[tuple], dict]


class WorkerError(RuntimeError):
    """A forked worker failed; `errno` is that of the OSError it raised, if any."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


def init_worker() -> None:
    torch = sys.modules.get("torch")  # imported only on the --encoder path; never imported here
    if torch is not None:
        torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent stops a worker with SIGTERM (reap)


def take_task(counter, n: int) -> int | None:
    """Next task index from the counter shared by all processes, None when all are taken."""
    with counter.get_lock():
        i = counter.value
        if i >= n:
            return None
        counter.value = i + 1
    return i


def _worker_loop(tasks: list[tuple], work: Work, counter, conn, parent: int) -> None:
    """Forked worker: take tasks until none are left; send each summary (no features: the
    parent reads them from the part file), or the traceback of a failure."""
    init_worker()
    try:
        while os.getppid() == parent:  # stop if the parent died (e.g. kill -9)
            i = take_task(counter, len(tasks))
            if i is None:
                break
            res = work(tasks[i])
            res.pop("block", None)
            conn.send(res)
        conn.send({"done": True})
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        import traceback
        conn.send({"error": traceback.format_exc(), "summary": f"{type(e).__name__}: {e}",
                   "errno": getattr(e, "errno", None)})
    finally:
        conn.close()


def fork_worker(tasks: list[tuple], work: Work, counter) -> tuple[int, Any]:
    """(pid, receiving Connection) of a forked worker running _worker_loop.

    A bare os.fork, not multiprocessing.Process: the tasks reach the worker by fork either
    way, and Process.start costs the parent more while the worker has nothing to do.
    """
    from multiprocessing.connection import Connection
    parent = os.getpid()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: never returns into the caller's code (no atexit, no finally)
        code = 1
        try:
            os.close(r)
            _worker_loop(tasks, work, counter, Connection(w, readable=False), parent)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    return pid, Connection(r, writable=False)


def reap(pids: list[int], kill: bool = False) -> list[int]:
    """Wait for forked workers (SIGTERM them first if `kill`); their exit codes."""
    codes = []
    for pid in pids:
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        try:
            codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        except ChildProcessError:  # already reaped
            codes.append(0)
    return codes


def run_parallel(tasks: list[tuple], jobs: int, work: Work, handle: Callable[[dict], None],
                  started: Callable[[], None] | None = None, idle: Callable[[], None] | None = None) -> list[int]:
    """Run chunk tasks on the calling process plus `jobs - 1` forked workers.

    All processes take tasks from one shared counter, so the split balances itself (the
    parent also writes the output) and the tasks reach the workers by fork, unpickled.
    The parent hands every summary to `handle` as it comes: its own after each chunk, the
    workers' in between; `idle` runs once when it has only the workers' last results to
    wait for. Returns the workers' pids: they have sent everything but may still be
    exiting, so the caller finishes its output meanwhile and then calls `_finish_workers`.
    """
    import gc
    import multiprocessing as mp
    from multiprocessing.connection import wait
    counter = mp.get_context("fork").Value("q", 0)
    conns: dict[Any, int] = {}  # receiving end -> worker pid
    pids: list[int] = []
    finished = False
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()  # objects inherited by the workers stay out of their GC: fewer copy-on-write pages
    try:
        for _ in range(jobs - 1):
            pid, conn = fork_worker(tasks, work, counter)
            conns[conn] = pid
            pids.append(pid)
        gc.unfreeze()
        if started is not None:
            started()

        def take_results(timeout: float | None) -> None:
            for c in wait(list(conns), timeout):
                try:
                    res = c.recv()
                except EOFError:  # gone without its "done": it died (e.g. killed)
                    pid = conns.pop(c)
                    c.close()
                    code = reap([pid])[0]
                    pids.remove(pid)
                    raise WorkerError(f"featurize worker exited with code {code}") from None
                if "error" in res:
                    log.debug("featurize worker failed:\n%s", res["error"])
                    raise WorkerError(f"featurize worker failed: {res['summary']}", res.get("errno"))
                if res.get("done"):
                    conns.pop(c)
                    c.close()
                    continue
                handle(res)

        while True:
            take_results(0)  # write what the workers finished before taking a chunk, not while holding one
            i = take_task(counter, len(tasks))
            if i is None:
                break
            handle(work(tasks[i]))
        if conns and idle is not None and not wait(list(conns), 0):
            idle()  # only when there is a wait to fill
        while conns:
            take_results(None)
        finished = True
        return pids
    finally:
        gc.unfreeze()
        if not finished:
            for c in conns:
                c.close()
            reap(pids, kill=True)


def finish_workers(pids: list[int]) -> None:
    """Reap workers that have sent all their results (they only exit now)."""
    for code in reap(pids):
        if code:  # its results all arrived and were checked: the output is complete
            log.warning("a featurize worker exited with code %s after finishing its tasks", code)


