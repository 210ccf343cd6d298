"""Blocking and ``.aio`` faces for one async implementation, as Modal's client has.

All of the SDK's I/O runs on one event loop in a background thread, so a
blocking call from plain code and an ``await x.aio()`` from the caller's own
event loop share connections.  ``@live_method`` turns ``async def m(self, ...)``
into ``obj.m(...)`` (blocking) plus ``await obj.m.aio(...)``; ``@live_function``
does the same for static functions; ``@live_generator`` for async generators
(a plain iterator, and ``.aio`` an async iterator).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

from shoal.exception import AsyncUsageWarning

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


class _LoopThread:
    """The SDK's event loop, started on first use in a daemon thread."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def get(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is not None:
            return loop
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                started = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(started.set)
                    loop.run_forever()

                threading.Thread(target=run, name="shoal-sdk-loop", daemon=True).start()
                started.wait()
                self._loop = loop
            return self._loop


_loop_thread = _LoopThread()


def sdk_loop() -> asyncio.AbstractEventLoop:
    """The loop all SDK I/O runs on."""
    return _loop_thread.get()


def run_blocking(coro: Coroutine[Any, Any, R]) -> R:
    """Run ``coro`` on the SDK loop and wait for it."""
    loop = sdk_loop()
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        coro.close()
        raise RuntimeError("a blocking shoal call was made on shoal's own event loop; use the .aio form")
    if running is not None:
        warnings.warn(
            "A blocking shoal interface is being used in an async context; use the `.aio` form"
            " (e.g. `await sb.exec.aio(...)`) so the event loop is not blocked.",
            AsyncUsageWarning,
            stacklevel=3,
        )
    fut = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return fut.result()
    except KeyboardInterrupt:
        fut.cancel()
        raise


async def run_async(coro: Coroutine[Any, Any, R]) -> R:
    """Await ``coro`` on the SDK loop from any loop."""
    loop = sdk_loop()
    if asyncio.get_running_loop() is loop:
        return await coro
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))


def _copy_meta(wrapper: object, fn: object) -> None:
    for attr in ("__doc__", "__name__", "__qualname__", "__module__"):
        if hasattr(fn, attr):
            setattr(wrapper, attr, getattr(fn, attr))
    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]


class Live(Generic[P, R]):
    """A callable that blocks, with an ``.aio`` twin that awaits."""

    def __init__(self, fn: Callable[P, Awaitable[R]]) -> None:
        self._fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return run_blocking(self._call(*args, **kwargs))

    def aio(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
        """The async form."""
        return run_async(self._call(*args, **kwargs))

    async def _call(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return await self._fn(*args, **kwargs)


class live_method(Generic[P, R]):
    """Decorator for ``async def`` methods: ``obj.m()`` blocks, ``await obj.m.aio()`` awaits."""

    def __init__(self, fn: Callable[Concatenate[Any, P], Awaitable[R]]) -> None:
        self._fn = fn
        _copy_meta(self, fn)

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> live_method[P, R]: ...
    @overload
    def __get__(self, obj: object, owner: type | None = None) -> Live[P, R]: ...
    def __get__(self, obj: object | None, owner: type | None = None) -> Live[P, R] | live_method[P, R]:
        if obj is None:
            return self
        return Live(functools.partial(self._fn, obj))


class live_function(Generic[P, R]):
    """Decorator for static async functions (``Sandbox.create``)."""

    def __init__(self, fn: Callable[P, Awaitable[R]]) -> None:
        self._live = Live(fn)
        _copy_meta(self, fn)

    def __get__(self, obj: object | None, owner: type | None = None) -> Live[P, R]:
        return self._live


_DONE = object()


async def _next(agen: AsyncIterator[T]) -> Any:
    try:
        return await agen.__anext__()
    except StopAsyncIteration:
        return _DONE


async def _aclose(agen: AsyncIterator[T]) -> None:
    aclose = getattr(agen, "aclose", None)
    if aclose is not None:
        await aclose()


def iterate_blocking(agen: AsyncIterator[T]) -> Iterator[T]:
    """A plain iterator over an async iterator that lives on the SDK loop.

    Leaving it early (``break``, an exception, garbage collection) closes the async iterator at once, so what it
    holds open (a stream, a watch in a sandbox) is released then, not whenever the SDK loop collects it.
    """
    try:
        while True:
            item = run_blocking(_next(agen))
            if item is _DONE:
                return
            yield item
    finally:
        with contextlib.suppress(Exception):  # e.g. collected on the SDK loop's own thread: its finalizer closes it
            run_blocking(_aclose(agen))


async def iterate_async(agen: AsyncIterator[T]) -> AsyncIterator[T]:
    """An async iterator (for any loop) over an async iterator that lives on the SDK loop (closed with it)."""
    try:
        while True:
            item = await run_async(_next(agen))
            if item is _DONE:
                return
            yield item
    finally:
        with contextlib.suppress(Exception):
            await run_async(_aclose(agen))


class LiveGen(Generic[P, T]):
    """A generator function with a plain-iterator face and an async-iterator ``.aio``."""

    def __init__(self, fn: Callable[P, AsyncIterator[T]]) -> None:
        self._fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Iterator[T]:
        return iterate_blocking(self._fn(*args, **kwargs))

    def aio(self, *args: P.args, **kwargs: P.kwargs) -> AsyncIterator[T]:
        """The async form."""
        return iterate_async(self._fn(*args, **kwargs))


class live_generator(Generic[P, T]):
    """Decorator for static async generator functions (``Sandbox.list``)."""

    def __init__(self, fn: Callable[P, AsyncIterator[T]]) -> None:
        self._live = LiveGen(fn)
        _copy_meta(self, fn)

    def __get__(self, obj: object | None, owner: type | None = None) -> LiveGen[P, T]:
        return self._live


class live_method_generator(Generic[P, T]):
    """Decorator for async generator methods (``sb.watch``): ``obj.m()`` is a plain iterator, ``obj.m.aio()`` an
    async iterator."""

    def __init__(self, fn: Callable[Concatenate[Any, P], AsyncIterator[T]]) -> None:
        self._fn = fn
        _copy_meta(self, fn)

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> live_method_generator[P, T]: ...
    @overload
    def __get__(self, obj: object, owner: type | None = None) -> LiveGen[P, T]: ...
    def __get__(self, obj: object | None, owner: type | None = None) -> LiveGen[P, T] | live_method_generator[P, T]:
        if obj is None:
            return self
        return LiveGen(functools.partial(self._fn, obj))
