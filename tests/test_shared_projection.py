"""SharedProjection: one matmul per forward for every module that projects the same input."""

import torch
from torch import nn

from rtdiff_cluster.ops.shared_projection import SharedProjection, Slot, stacked


def test_a_new_input_is_projected_again_and_the_cached_one_kept_alive():
    # engine/step_cache.py runs a UNet's first block outside the backbone's forward, so no hook
    # clears the last result, and each step's time embedding is a new tensor freed on return. Were
    # the cache keyed by id and address alone, the next step's tensor could take both (Python
    # reuses ids, the CUDA caching allocator memory) and get the last step's projection. The
    # cache holds its input, so neither can be reused while it is cached.
    import gc
    import weakref

    shared = SharedProjection(nn.Linear(8, 4))
    inputs = []

    def first_block(step: int) -> torch.Tensor:
        temb = torch.full((1, 8), float(step))
        inputs.append(weakref.ref(temb))
        return shared.of(temb)

    with torch.inference_mode():  # as the engine runs it (no autograd graph keeping inputs)
        for step in range(4):
            got = first_block(step)
            gc.collect()
            assert inputs[-1]() is not None  # still cached, so still alive
            torch.testing.assert_close(got, shared.proj(torch.full((1, 8), float(step))), rtol=0, atol=0)
    shared.forget()
    gc.collect()
    assert all(ref() is None for ref in inputs)  # nothing kept once forgotten


def test_one_call_per_input_and_slots_read_their_columns():
    a, b = nn.Linear(6, 3), nn.Linear(6, 5)
    extra = torch.randn(5)
    shared = SharedProjection(stacked([a, b], [None, extra]))
    calls = []
    shared.proj.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 6)
    sa, sb = Slot(shared, 0, 3), Slot(shared, 3, 5)
    torch.testing.assert_close(sa.of(x), a(x))
    torch.testing.assert_close(sb.of(x), b(x) + extra)
    assert len(calls) == 1
    shared.forget()
    sa.of(x)
    assert len(calls) == 2
