"""Generator states across device types: a checkpoint moved between CUDA and CPU still loads."""

from __future__ import annotations

import torch

from las_env.checkpoint import restore_generator


def test_same_kind_state_is_restored_exactly():
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    expected = torch.rand(5, generator=g)
    h = torch.Generator().manual_seed(99)
    restore_generator(h, state)
    assert torch.equal(torch.rand(5, generator=h), expected)


def test_foreign_state_reseeds_deterministically_from_the_state():
    # A CUDA (Philox) generator's state is 16 bytes: seed and offset.
    cuda_like = torch.arange(16, dtype=torch.uint8)
    other = cuda_like.clone()
    other[0] = 255
    draws = []
    for state in (cuda_like, cuda_like, other):
        g = torch.Generator().manual_seed(0)
        restore_generator(g, state)
        draws.append(torch.rand(4, generator=g))
    assert torch.equal(draws[0], draws[1])  # the same checkpoint continues the same way
    assert not torch.equal(draws[0], draws[2])  # a different saved state gives another stream
    assert not torch.equal(draws[0], torch.rand(4, generator=torch.Generator().manual_seed(0)))
