"""The Dask engine: the same units on a Dask distributed cluster, for several
nodes that share a filesystem (``farm.engine = "dask"``; needs the ``dask``
extra)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from selfloop.farm.engines import (
    FarmStats,
    FarmUnavailable,
    Interrupted,
    Progress,
    UnitFailure,
    call,
    dispatch_order,
    never,
)
from selfloop.farm.worker import prepare_process, to_host


def _dask_call(fn: Callable, item: Any, cache_root: str | None) -> Any:
    prepare_process(None, cache_root, None)
    return to_host(fn(item))


class DaskFarm:
    """The same units on a Dask distributed cluster (``dask worker --nthreads 1``)."""

    def __init__(self, address_or_cluster: Any, cache_root: str | None = None, max_attempts: int = 3,
                 connect_seconds: float = 20.0):
        try:
            from distributed import Client
        except ModuleNotFoundError:
            raise FarmUnavailable('the dask engine needs distributed: pip install -e ".[dask]"') from None
        try:
            self.client = Client(address_or_cluster, timeout=connect_seconds)
        except (OSError, TimeoutError) as error:
            raise FarmUnavailable(f"farm.scheduler: cannot reach the Dask scheduler at {address_or_cluster} "
                                  f"within {connect_seconds:.0f} s ({error})") from None
        self.cache_root, self.max_attempts = cache_root, max_attempts
        self.stats = FarmStats(workers=len(self.client.scheduler_info()["workers"]))
        self.should_stop: Callable[[], bool] = never
        self.progress: Progress | None = None

    def map(self, fn: Callable, items: list, cost: list[float] | None = None) -> list:
        rank = {index: len(items) - position for position, index in enumerate(dispatch_order(len(items), cost))}
        futures = [
            self.client.submit(_dask_call, fn, item, self.cache_root, pure=False, retries=self.max_attempts - 1,
                               priority=rank[index])  # Dask runs higher priorities first
            for index, item in enumerate(items)
        ]
        results = []
        for index, future in enumerate(futures):
            try:
                while not future.done():
                    if self.should_stop():
                        self.client.cancel(futures)
                        raise Interrupted
                    distributed_wait(future, timeout=1.0)
                results.append(future.result())
                if self.progress:
                    self.progress(index + 1, len(items))
            except Interrupted:
                raise
            except Exception as error:  # noqa: BLE001 - reported as a failed unit
                self.stats.failures += 1
                results.append(UnitFailure(index, repr(error), self.max_attempts))
        return results

    def broadcast(self, fn: Callable) -> list:
        """Run ``fn()`` once on every Dask worker."""
        cache_root = self.cache_root
        return list(self.client.run(lambda: _dask_call(call, fn, cache_root)).values())

    def close(self, now: bool = False) -> None:
        self.client.close()


def distributed_wait(future, timeout: float) -> None:
    """Wait for ``future`` at most ``timeout`` seconds (returns either way)."""
    from distributed import wait

    try:
        wait(future, timeout=timeout)
    except TimeoutError:
        pass
