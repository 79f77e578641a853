"""The CPU output cache (pyllm.memory): large outputs are reused, capped,
released by empty_cache, and behave as ordinary tensors."""

import torch

import pyllm


def test_large_outputs_are_reused_and_released():
    pyllm.empty_cache()
    x = torch.randn(1024, 1024)  # 4 MiB outputs
    y = pyllm.rms_norm(x)
    address = y.data_ptr()
    del y
    assert pyllm.cached_bytes() >= 4 * 2**20
    y = pyllm.rms_norm(x)
    assert y.data_ptr() == address  # the freed output came back
    del y
    assert pyllm.empty_cache() >= 4 * 2**20
    assert pyllm.cached_bytes() == 0


def test_small_outputs_bypass_the_cache():
    pyllm.empty_cache()
    y = pyllm.rms_norm(torch.randn(4, 64))
    del y
    assert pyllm.cached_bytes() == 0


def test_cached_outputs_are_ordinary_tensors():
    y = pyllm.rms_norm(torch.randn(1024, 1024))
    y.resize_(2048, 2048)  # resizable, through the same allocator
    y.fill_(1.0)
    assert float(y.sum()) == 2048 * 2048
    z = y.clone()
    del y
    assert float(z.sum()) == 2048 * 2048
