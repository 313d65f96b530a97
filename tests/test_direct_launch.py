"""DirectLaunch's bookkeeping on the CPU: what it hands Triton's launcher on a miss and on a repeat, with
stand-ins for the JIT function, the compiled kernel, the driver and the launch hooks (the real launches
are GPU tests in tests/test_int8_matmul.py: the bits of every repeat against Triton's own launch)."""

import types

import pytest

from deepseek_kernels.triton import _direct


class FakeKernel:
    """A CompiledKernel stand-in: records ``run`` calls and ``launch_metadata`` builds."""

    function, packed_metadata = 0xF00, ("packed",)

    def __init__(self):
        self.runs, self.metadata_builds = [], 0

    def launch_metadata(self, grid, stream, *values):
        self.metadata_builds += 1
        return {"name": "fake", "values": values}

    def run(self, *call):
        self.runs.append(call)


class FakeJit:
    """A JITFunction stand-in: ``fn[grid](*args, **constexprs, **options)`` compiles (once per call here) and
    returns the kernel."""

    def __init__(self, names):
        self.params = [types.SimpleNamespace(name=n) for n in names]
        self.launches = []
        self.kernel = FakeKernel()

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.launches.append((grid, args, kw))
            return self.kernel
        return launch


class Chain:
    """Triton 3.8's HookChain shape: a ``calls`` list, called with the launch metadata."""

    def __init__(self, *calls):
        self.calls = list(calls)

    def __call__(self, metadata):
        for c in self.calls:
            c(metadata)


@pytest.fixture
def fake_triton(monkeypatch):
    runtime = types.SimpleNamespace(launch_enter_hook=Chain(), launch_exit_hook=None)
    driver = types.SimpleNamespace(active=types.SimpleNamespace(get_current_device=lambda: 0,
                                                                get_current_stream=lambda device: 1234))
    monkeypatch.setattr(_direct, "_enabled", True)
    monkeypatch.setattr(_direct, "_knobs", types.SimpleNamespace(runtime=runtime))
    monkeypatch.setattr(_direct, "_driver", driver)
    return runtime


def test_miss_compiles_through_the_jit_then_repeats_call_the_launcher(fake_triton):
    fn = FakeJit(["a", "b", "n", "BLOCK", "FLAG"])
    launch = _direct.DirectLaunch(fn)
    args, constexprs = ("A", "B", 7), {"FLAG": True, "BLOCK": 64}
    assert launch.launch_cached("k", (3,), args) is False  # never launched: the caller must call it
    launch("k", (3,), args, constexprs, num_warps=4)
    assert fn.launches == [((3,), args, {"FLAG": True, "BLOCK": 64, "num_warps": 4})] and fn.kernel.runs == []
    assert (launch.misses, launch.hits) == (1, 0)

    # repeats: the remembered constexprs in parameter order, whatever the caller passes (launch_cached passes none)
    launch("k", (5, 2), ("A2", "B2", 7), {"FLAG": True, "BLOCK": 64}, num_warps=4)
    assert launch.launch_cached("k", (6,), ("A3", "B3", 7)) is True
    assert len(fn.launches) == 1 and (launch.misses, launch.hits) == (1, 2)
    hooks = fake_triton
    want = [(5, 2, 1, 1234, 0xF00, ("packed",), None, hooks.launch_enter_hook, None, "A2", "B2", 7, 64, True),
            (6, 1, 1, 1234, 0xF00, ("packed",), None, hooks.launch_enter_hook, None, "A3", "B3", 7, 64, True)]
    assert fn.kernel.runs == want
    assert fn.kernel.metadata_builds == 0  # no hook in the chain: no metadata built

    # another key or another device is a miss again
    assert launch.launch_cached("other", (1,), args) is False
    _direct._driver.active.get_current_device = lambda: 1
    assert launch.launch_cached("k", (1,), args) is False


def test_repeats_feed_a_set_enter_hook(fake_triton):
    fn = FakeJit(["x", "BLOCK"])
    launch = _direct.DirectLaunch(fn)
    launch("k", (1,), ("X",), {"BLOCK": 16})
    seen = []
    fake_triton.launch_enter_hook.calls.append(seen.append)
    assert launch.launch_cached("k", (2,), ("Y",))
    (run,) = fn.kernel.runs
    assert run[6] == {"name": "fake", "values": ("Y", 16)} and fn.kernel.metadata_builds == 1
    # an older Triton's plain function hook (no chain) gets the metadata too; None means no hook
    fake_triton.launch_enter_hook = seen.append
    assert launch.launch_cached("k", (2,), ("Z",)) and fn.kernel.metadata_builds == 2
    fake_triton.launch_enter_hook = None
    assert launch.launch_cached("k", (2,), ("W",)) and fn.kernel.metadata_builds == 2
    assert fn.kernel.runs[-1][6] is None


def test_cache_is_cleared_past_its_bound(fake_triton, monkeypatch):
    monkeypatch.setattr(_direct, "_MAX_ENTRIES", 2)
    fn = FakeJit(["x", "BLOCK"])
    launch = _direct.DirectLaunch(fn)
    for key in ("a", "b", "c"):
        launch(key, (1,), ("X",), {"BLOCK": 16})
    assert set(launch.cache) == {(0, "c")}
    assert launch.launch_cached("a", (1,), ("X",)) is False and launch.launch_cached("c", (1,), ("X",)) is True


def test_off_means_the_jit_launch_every_time(fake_triton, monkeypatch):
    monkeypatch.setattr(_direct, "_enabled", False)
    fn = FakeJit(["x", "BLOCK"])
    launch = _direct.DirectLaunch(fn)
    assert launch.launch_cached("k", (1,), ("X",)) is False
    for _ in range(2):
        launch("k", (1,), ("X",), {"BLOCK": 16})
    assert len(fn.launches) == 2 and fn.kernel.runs == [] and not launch.cache
