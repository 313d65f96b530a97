"""A GPU check shared by the programmatic-dependent-launch tests."""

import torch


def assert_pdl_gives_the_bits(run, xs, want):
    """With programmatic dependent launches on, ``run`` on each input of ``xs``, eager and replayed from one CUDA
    graph, gives the bits in ``want`` (computed without them): a kernel that read its input before the kernel
    before it had written it would see the previous call's."""
    from deepseek_kernels.ops._registry import programmatic_launches

    with programmatic_launches(True):
        assert all(torch.equal(run(v), r) for v, r in zip(xs, want))
        static_x = xs[0].clone()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_out = run(static_x)
    for v, r in zip(xs, want):
        static_x.copy_(v)
        g.replay()
        assert torch.equal(static_out, r)
