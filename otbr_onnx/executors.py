"""Where batch work runs: one small piece, chosen per run, that runs ``task(model, out_dir,
options)`` for every model and yields each ``Outcome`` as its model finishes.

* ``SerialExecutor``: one model after another in this process (``--jobs 1``);
* ``ProcessExecutor``: a local pool of ``--jobs`` spawned processes;
* ``RayExecutor``: Ray tasks, each with its own CPU/GPU request, on a local Ray instance or an
  existing cluster (``--executor ray --address ...``; the ``[ray]`` extra).

Everything else (which models are done already, the per-model files, ``summary.json``, the exit
code) lives in ``batch.py`` and is the same for every executor. A task never raises: it turns
every failure of its model into an Outcome; what an executor adds is the failure of the task
itself (a crashed worker), again as that model's Outcome.

Ctrl-C: the KeyboardInterrupt reaches the generator while it waits, or the caller closes it
(``contextlib.closing``); either way the executor stops every task before the interrupt goes on,
so that no worker can still be writing when the caller removes leftover temporary files.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from otbr_onnx.errors import UsageError, interrupts_deferred, one_line
from otbr_onnx.outcome import Outcome

LOG = logging.getLogger("otbr_onnx")
# A module-level function (pickled by reference to worker processes and Ray workers):
# task(model, out_dir, options) -> Outcome, never raising.
Task = Callable[..., Outcome]
EXECUTORS = ("local", "ray")  # choose_executor's names (--executor)
RAY_EXTRA = "--executor ray needs Ray: pip install 'otbr-onnx[ray]'"
# seconds to wait, after cancelling, until Ray reports every task ended (killed workers included)
RAY_CANCEL_WAIT = 30.0
# seconds to wait for Ray to disconnect (or stop the instance started for the run)
SHUTDOWN_WAIT = 20.0
# seconds an --address may take to accept a connection before it is refused as unreachable
CONNECT_TIMEOUT = 10.0


class Executor(Protocol):
    def map(self, task: Task, models: list[Path], out_dir: Path | None, options) -> Iterator[Outcome]:
        """Run ``task`` on every model; yield each Outcome as its model finishes (any order)."""


def choose_executor(jobs: int, executor: str, address: str | None, cpus_per_model: float | None,
                    gpus_per_model: float | None) -> Executor:
    """The batch executor the options ask for (``executor``: ``local`` or ``ray``; None means not
    given); contradictory options are usage errors."""
    ray_only = [flag for flag, value in (("--address", address), ("--cpus-per-model", cpus_per_model),
                                         ("--gpus-per-model", gpus_per_model)) if value is not None]
    if executor == "local":
        if ray_only:
            raise UsageError(f"{ray_only[0]} needs --executor ray")
        return ProcessExecutor(jobs) if jobs > 1 else SerialExecutor()
    if jobs != 1:
        raise UsageError("--jobs is for --executor local; Ray runs as many models at once as the cluster's "
                         "CPUs and GPUs allow (see --cpus-per-model, --gpus-per-model)")
    with interrupts_deferred():  # a large import: Ctrl-C held until it is done
        import_ray()
    return RayExecutor(address, 1.0 if cpus_per_model is None else cpus_per_model,
                       0.0 if gpus_per_model is None else gpus_per_model)


class SerialExecutor:
    """One model at a time, in this process: no start-up cost, and Ctrl-C lands in the task."""

    def map(self, task: Task, models: list[Path], out_dir: Path | None, options) -> Iterator[Outcome]:
        for model in models:
            yield task(model, out_dir, options)


class ProcessExecutor:
    """A pool of ``jobs`` local processes (spawned: forking after torch started its thread pool
    can deadlock the child)."""

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs

    def map(self, task: Task, models: list[Path], out_dir: Path | None, options) -> Iterator[Outcome]:
        with ProcessPoolExecutor(max_workers=self.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_signals) as pool:
            with _sigint_ignored():  # the workers start now and inherit the ignored Ctrl-C
                futures = [pool.submit(task, model, out_dir, options) for model in models]
            finished = False
            try:
                for future in as_completed(futures):
                    yield future.result()
                finished = True
            finally:
                if not finished:  # Ctrl-C while waiting, or the caller stopped early
                    _stop_workers(pool, futures)


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ctrl-C ignored while worker processes are spawned.

    A terminal sends SIGINT to every process of the foreground group, so each worker would
    print its own KeyboardInterrupt traceback (a worker still importing has no handler yet). An
    ignored signal stays ignored across exec, and Python keeps it so: the workers never see
    Ctrl-C, and the parent alone stops the batch (``_stop_workers``).
    """
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _worker_signals() -> None:
    """In each worker: ignore Ctrl-C (see above). SIGTERM from the parent keeps its default, a
    silent end: turned into an exception it surfaced as a traceback from wherever it landed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stop_workers(pool: ProcessPoolExecutor, futures: list[Future]) -> None:
    """Drop the queued models and end the running ones; return once no worker is left."""
    for future in futures:
        future.cancel()
    pool.shutdown(wait=False, cancel_futures=True)
    workers = multiprocessing.active_children()  # the pool's processes: public API, unlike pool._processes
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.join(timeout=10)
        if worker.is_alive():  # stuck inside a long native call
            worker.kill()
            worker.join()


class RayExecutor:
    """One Ray task per model, each requesting ``cpus_per_model`` CPUs and ``gpus_per_model``
    GPUs, on the cluster at ``address`` (``auto``, ``HOST:PORT`` or ``ray://HOST:10001``) or on a
    Ray instance started here when ``address`` is None. A process already connected to Ray
    (``ray.is_initialized()``) keeps its connection, and it stays open afterwards.

    The workers read the models and write the outputs by path, so on a cluster of several machines
    the input and output folders must be on a file system every node mounts at the same path; a
    worker that cannot see them fails its model with a message saying so.
    """

    def __init__(self, address: str | None = None, cpus_per_model: float = 1.0, gpus_per_model: float = 0.0) -> None:
        self.address = address
        self.cpus_per_model = cpus_per_model
        self.gpus_per_model = gpus_per_model

    def map(self, task: Task, models: list[Path], out_dir: Path | None, options) -> Iterator[Outcome]:
        ray = import_ray()
        started = self._connect(ray)
        try:
            check_resources(ray.nodes(), self.cpus_per_model, self.gpus_per_model, started_here=started)
            yield from self._run(ray, task, models, out_dir, options)
        except BaseException:  # Ctrl-C, or closed early: leave without waiting on Ray for ever
            if started:
                started = False
                _bounded(ray.shutdown, SHUTDOWN_WAIT)
            raise
        finally:
            if started:
                ray.shutdown()

    def _connect(self, ray) -> bool:
        """Connect (or start a local instance); True when this call did, and must disconnect."""
        if ray.is_initialized():
            return False
        if self.address is not None:
            check_reachable(self.address)

        # log_to_driver off: the workers' output would interleave with ours, and every failure
        # comes back as an Outcome anyway
        settings = {"log_to_driver": False, "logging_level": logging.ERROR}
        if self.address is None:  # only a new instance takes this (a cluster refuses it)
            settings["include_dashboard"] = False
        try:
            ray.init(address=self.address, **settings)
        except Exception as error:  # noqa: BLE001 - refused, timed out, unauthenticated, a bad address
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
            raise UsageError(f"cannot connect to {where}: {one_line(error)}") from error
        return True

    def _run(self, ray, task: Task, models: list[Path], out_dir: Path | None, options) -> Iterator[Outcome]:
        from otbr_onnx import __version__

        # max_retries=1: one more try if a node is lost, not three for a model that kills its worker
        remote = ray.remote(num_cpus=self.cpus_per_model, num_gpus=self.gpus_per_model, max_retries=1)(on_worker)
        where = out_dir.absolute() if out_dir is not None else None  # workers do not share our cwd
        pending = {remote.remote(task, model.absolute(), where, options, __version__): model for model in models}
        finished = False
        try:
            while pending:
                for ref in _ready(ray, list(pending)):
                    model = pending.pop(ref)
                    yield _as_given(_result(ray, ref, model), model, out_dir)
            finished = True
        finally:
            if not finished:
                _cancel(ray, list(pending))


def check_resources(nodes: list[dict], cpus: float, gpus: float, started_here: bool) -> None:
    """A task no node can hold waits forever. On the instance started for this run no node will
    join: refuse. An existing cluster may add nodes (an autoscaler): say so, and wait."""
    for name, need, flag in (("CPU", cpus, "--cpus-per-model"), ("GPU", gpus, "--gpus-per-model")):
        most = max((node["Resources"].get(name, 0.0) for node in nodes if node.get("Alive")), default=0.0)
        if need > most:
            text = f"{flag} {need:g}: no Ray node has that many {name}s (the largest has {most:g})"
            if started_here:
                raise UsageError(text)
            LOG.warning("%s; the tasks wait until such a node joins the cluster", text)


def _ready(ray, refs: list) -> list:
    """Wait until at least one task has finished; return every task finished by then. (One
    ``ray.wait`` per finished model would cost time quadratic in the models of a large sweep.)"""
    first, rest = ray.wait(refs, num_returns=1)
    if not rest:
        return first
    more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
    return first + more


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Refuse a ``HOST:PORT`` or ``ray://HOST:PORT`` address nothing answers on: ``ray.init`` would
    wait for it without end, logging a warning every 30 s. (``auto`` Ray resolves, and refuses, itself.)"""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        if address.startswith("ray://") or ":" in address:
            raise UsageError(f"--address {address}: expected HOST:PORT, ray://HOST:PORT or auto")
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UsageError(f"--address {address}: no Ray cluster answers there ({reason})") from error


def _result(ray, ref, model: Path) -> Outcome:
    """The task's Outcome, or a failed one when the task itself failed (its worker crashed or
    ran out of memory, its node died): one model's failure, never the sweep's."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as error:
        return Outcome(str(model), "failed", 1, f"Ray task failed: {type(error).__name__}: {one_line(error)}")


def _cancel(ray, refs: list) -> None:
    """Cancel every unfinished task (killing the workers that run one) and wait until Ray reports
    each ended, so that none is still writing into the output folder when we return."""
    def cancel_and_wait() -> None:
        for ref in refs:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - finished meanwhile, or the cluster is gone: nothing to stop
                pass
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=RAY_CANCEL_WAIT)

    _bounded(cancel_and_wait, RAY_CANCEL_WAIT + 5.0)


def _bounded(call: Callable[[], object], seconds: float) -> None:
    """``call()`` on a daemon thread, waited for at most ``seconds``. On the way out after Ctrl-C
    a busy cluster's cancel or disconnect was seen to hang past a minute (once, under CI); the
    tasks die with their owner, this driver, anyway, so the exit must not wait on Ray for ever."""
    def guarded() -> None:
        try:
            call()
        except Exception as error:  # noqa: BLE001 - on the way out: a failed cleanup is not the story
            LOG.debug("Ray cleanup failed: %s", error)

    worker = threading.Thread(target=guarded, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        LOG.warning("Ray did not answer within %.0f s; exiting without waiting for it", seconds)


def _as_given(outcome: Outcome, model: Path, out_dir: Path | None) -> Outcome:
    """The worker saw absolute paths; report the model and output (in messages too) as the user
    named them, so the summary reads the same as with a local executor."""
    message = outcome.message.replace(str(model.absolute()), str(model))
    output = outcome.output
    if out_dir is not None:
        message = message.replace(str(out_dir.absolute()), str(out_dir))
        output = str(out_dir / Path(output).name) if output else output
    return dataclasses.replace(outcome, model=str(model), output=output, message=message)


def on_worker(task: Task, model: Path, out_dir: Path | None, options, version: str) -> Outcome:
    """A Ray task: check that this worker sees the same otbr-onnx and the batch's files, then
    run ``task``. A mismatch fails the model with a message naming the node."""
    from otbr_onnx import __version__

    host = socket.gethostname()
    if __version__ != version:
        return Outcome(str(model), "failed", 2, f"otbr-onnx {__version__} on Ray node {host}, {version} on the "
                                                "driver: install the same version on every node")
    missing = [p for p in (model, out_dir) if p is not None and not os.path.exists(p)]
    if missing:
        return Outcome(str(model), "failed", 2, f"{missing[0]} is not visible on Ray node {host}: the input and "
                                                "output folders must be on a file system shared by every node")
    return task(model, out_dir, options)


def import_ray():
    """Ray, or one usage error naming the extra that installs it."""
    try:
        import ray
    except ImportError as error:
        raise UsageError(RAY_EXTRA) from error
    return ray
