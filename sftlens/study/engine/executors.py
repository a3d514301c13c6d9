"""Executors: where a study's units run. The driver (`engine.run_units`) decides what runs when;
an executor only starts units (`submit`) and reports the ones that ended (`wait`).

- `LocalExecutor`: in the driver process, one unit at a time; or, with several local GPUs, a pool
  of worker processes each pinned to one GPU (`CUDA_VISIBLE_DEVICES`), one unit per GPU.
- `RayExecutor`: each unit a Ray task declaring its CPU/GPU needs, so Ray places it on a cluster
  (workers must see the study directory on a shared filesystem). Tasks are never retried by Ray:
  a unit runs once per `study run`, and a failed one is re-run by the next `study run`.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os

from sftlens.errors import SftlensError
from sftlens.study.engine.scheduler import timed_execute


def _completed(fn, *args) -> cf.Future:
    future: cf.Future = cf.Future()
    try:
        future.set_result(fn(*args))
    except Exception as err:  # a failed unit is recorded; KeyboardInterrupt still stops the study
        future.set_exception(err)
    return future


def _future_outcomes(futures) -> list:
    out = []
    for future in futures:
        err = future.exception()
        if err is None:
            result, seconds = future.result()
            out.append((future, True, result, seconds))
        else:
            out.append((future, False, err, 0.0))
    return out


def _pin_gpu(slots) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = str(slots.get())


class LocalExecutor:
    """One unit at a time in this process (`workers=1`), or a process pool of `workers`."""

    def __init__(self, workers: int | None = None):
        gpus = _local_gpu_count()
        self.capacity = workers or max(1, gpus)
        self._pool = None
        if self.capacity > 1:
            context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
            slots = context.Queue()
            for i in range(self.capacity):
                slots.put(i % gpus if gpus else "")
            self._pool = cf.ProcessPoolExecutor(self.capacity, mp_context=context, initializer=_pin_gpu, initargs=(slots,))

    def submit(self, unit, payload) -> cf.Future:
        if self._pool is None:
            return _completed(timed_execute, payload)
        return self._pool.submit(timed_execute, payload)

    def wait(self, handles) -> list:
        done, _ = cf.wait(handles, return_when=cf.FIRST_COMPLETED)
        return _future_outcomes(done)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)


def _local_gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


class RayExecutor:
    """Each unit a Ray task with `num_cpus`/`num_gpus` from the unit; connects to `address` or
    starts a local Ray instance."""

    capacity = 1 << 30  # Ray queues tasks until their resources are free

    def __init__(self, address: str | None = None, **init_kwargs):
        try:
            import ray
        except ImportError:
            raise SftlensError("the Ray executor needs ray: pip install 'sftlens[ray]'") from None
        self.ray = ray
        self._started = False
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, **init_kwargs)
            except ConnectionError as err:
                raise SftlensError(f"cannot connect to Ray at {address}: {err}") from None
            self._started = True
        self._task = ray.remote(max_retries=0)(timed_execute)

    def submit(self, unit, payload):
        ref = self._task.options(num_cpus=unit.cpus, num_gpus=unit.gpus, name=unit.label).remote(payload)
        return ref

    def wait(self, handles) -> list:
        ready, _ = self.ray.wait(handles, num_returns=1)
        out = []
        for ref in ready:
            try:
                result, seconds = self.ray.get(ref)
                out.append((ref, True, result, seconds))
            except self.ray.exceptions.RayTaskError as err:
                out.append((ref, False, _task_cause(err), 0.0))
            except self.ray.exceptions.RayError as err:
                out.append((ref, False, err, 0.0))
        return out

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()


def _task_cause(err) -> BaseException:
    """The unit's own exception inside a RayTaskError (so SftlensError messages stay one line)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


def make_executor(name: str, address: str | None = None, workers: int | None = None):
    if name == "local":
        if address:
            raise SftlensError("--address is for --executor ray")
        return LocalExecutor(workers)
    if name == "ray":
        return RayExecutor(address)
    raise SftlensError(f"unknown executor {name!r} (local or ray)")
