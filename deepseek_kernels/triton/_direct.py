"""Repeat launches of a compiled Triton kernel without ``JITFunction.run``'s per-call work.

``kernel[grid](...)`` binds the arguments, derives the specialization, hashes a cache key, checks
the kernel's globals and then calls the compiled kernel's launcher. On the H200 machine's host that
costs ~19 us per launch (benchmarks/diag_eager_overhead.py, session 10), more than many decode-sized
kernels take, so eager calls there are host-bound. :class:`DirectLaunch` does that work once per
*caller key* and afterwards calls the launcher of the cached ``CompiledKernel`` the way
``JITFunction.run`` does (same stream, same launch hooks, every parameter in order).

The caller's key must determine everything Triton specializes a compile on: the constexpr values,
every integer argument's value (Triton specializes ints equal to 1 and multiples of 16), each
tensor's dtype, and each pointer's 16-byte alignment. The launchers in ``deepseek_kernels.ops``
build it from the shapes, strides and dtypes they already hold and send unaligned pointers down the
ordinary path (:func:`aligned`). A key seen for the first time goes through ``kernel[grid]`` (which
compiles or finds the kernel in Triton's cache) and remembers the ``CompiledKernel`` it returns.

Off with ``DSK_DIRECT_LAUNCH=0`` (every launch then takes ``kernel[grid]``), under the Triton
interpreter, and on Triton versions whose launch protocol this was not written against.
"""

from __future__ import annotations

import os

_MAX_ENTRIES = 1024  # per kernel; past this the cache is cleared (shapes churn: one compile lookup each)


def _protocol_ok() -> bool:
    """Whether this Triton launches compiled kernels the way :meth:`DirectLaunch.__call__` does
    (``CompiledKernel.run(gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter_hook,
    exit_hook, *args)`` with hooks in ``triton.knobs.runtime``: Triton 3.4 to 3.8, checked on 3.6 and 3.8)."""
    try:
        import triton

        major, minor = (int(v) for v in triton.__version__.split(".")[:2])
        from triton import knobs  # noqa: F401
        from triton.compiler.compiler import CompiledKernel

        return (3, 4) <= (major, minor) <= (3, 8) and hasattr(CompiledKernel, "launch_metadata")
    except (ImportError, ValueError):
        return False


_enabled: bool | None = None
_knobs = _driver = None  # triton.knobs and triton.runtime.driver, bound once (an import per launch costs)


def enabled() -> bool:
    """Whether direct launches are on (read once from the environment; :func:`refresh` rereads)."""
    global _enabled, _knobs, _driver
    if _enabled is None:
        from deepseek_kernels.ops._registry import interpreting

        _enabled = (os.environ.get("DSK_DIRECT_LAUNCH", "1") != "0" and not interpreting()
                    and _protocol_ok())
        if _enabled:
            from triton import knobs
            from triton.runtime import driver

            _knobs, _driver = knobs, driver
    return _enabled


def refresh() -> None:
    """Rereads ``DSK_DIRECT_LAUNCH`` and ``TRITON_INTERPRET`` on the next launch (tests toggle them)."""
    global _enabled
    _enabled = None


def aligned(*tensors) -> bool:
    """Whether every given tensor's data pointer is 16-byte aligned (None entries are skipped): the
    one pointer property Triton specializes on."""
    bits = 0
    for t in tensors:
        if t is not None:
            bits |= t.data_ptr()
    return bits & 15 == 0


def hooks_quiet() -> bool:
    """Whether no Triton launch-enter hook is set (None on older Triton, an empty HookChain on 3.8): launches that
    bypass Triton's launcher (the C++ ones) may then skip the hook without anyone missing it. Call after
    :func:`enabled` returned True."""
    enter = _knobs.runtime.launch_enter_hook
    return enter is None or getattr(enter, "calls", None) == []


class DirectLaunch:
    """``launch(key, grid, args, constexprs, **options)`` runs ``fn[grid](*args, **constexprs, **options)``:
    ``args`` are the leading (runtime) parameters in order, ``constexprs`` name every remaining
    parameter, ``options`` are launch options (num_warps, num_stages). ``key`` must determine the
    constexprs and options as well as the specialization (see the module docstring).
    ``launch.launch_cached(key, grid, args)`` repeats a key already launched without them."""

    def __init__(self, fn):
        self.fn = fn
        self.tail_names: tuple | None = None  # the parameters after the runtime args (set on first use)
        self.cache: dict = {}  # (device, key) -> (CompiledKernel, the constexpr values after the runtime args)
        self.hits = 0  # counters for tests and diagnostics
        self.misses = 0

    def launch_cached(self, key, grid, args: tuple) -> bool:
        """Launches ``args`` with the kernel, constexprs and options remembered for ``key`` and returns True, or
        returns False (nothing launched) when ``key`` has not been launched on this device yet, or direct
        launches are off: then call the launcher itself. Lets a caller build its constexpr dict and options
        only on a miss (tens of dict entries per call: microseconds that a large eager GEMM's host side
        feels on a slow host)."""
        if not enabled():
            return False
        device = _driver.active.get_current_device()
        entry = self.cache.get((device, key))
        if entry is None:
            return False
        self._run(entry, grid, args, device)
        return True

    def kernel_for(self, key):
        """The CompiledKernel remembered for ``key`` on the current device, or None."""
        entry = self.cache.get((_driver.active.get_current_device(), key)) if enabled() else None
        return None if entry is None else entry[0]

    def __call__(self, key, grid, args: tuple, constexprs: dict, **options):
        """Launches; returns the CompiledKernel when this call compiled or looked it up (a miss), else None."""
        if not enabled():
            self.fn[grid](*args, **constexprs, **options)
            return None
        device = _driver.active.get_current_device()
        full_key = (device, key)
        entry = self.cache.get(full_key)
        if entry is None:
            self.misses += 1
            kernel = self.fn[grid](*args, **constexprs, **options)
            if self.tail_names is None:
                self.tail_names = tuple(p.name for p in self.fn.params[len(args):])
            if len(self.cache) >= _MAX_ENTRIES:
                self.cache.clear()
            self.cache[full_key] = (kernel, tuple(constexprs[name] for name in self.tail_names))
            return kernel
        self._run(entry, grid, args, device)
        return None

    def _run(self, entry, grid, args, device) -> None:
        kernel, tail = entry
        self.hits += 1
        values = args + tail
        stream = _driver.active.get_current_stream(device)
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        runtime = _knobs.runtime
        enter = runtime.launch_enter_hook
        # launch_metadata only feeds the enter hook: skip building it when no hook is set (3.8 builds a LazyDict
        # even for an empty HookChain)
        metadata = None if hooks_quiet() else kernel.launch_metadata(grid, stream, *values)
        kernel.run(grid[0], g1, g2, stream, kernel.function, kernel.packed_metadata, metadata,
                   enter, runtime.launch_exit_hook, *values)
