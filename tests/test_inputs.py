"""The semantic-map families of scm_ops.testing (what the benchmarks and the module tests
feed ActivationDiffusion): shape, dtype, sign, spatial correlation, and bad names."""
import pytest
import torch

from scm_ops.testing import MAP_FAMILIES, semantic_maps


def _neighbour_correlation(s):
    """Correlation of horizontally adjacent cells over batch, channels and rows."""
    a, b = s[..., :-1].flatten(), s[..., 1:].flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_families_have_their_stated_properties():
    maps = {f: semantic_maps(f, 4, 16, 14, 14, torch.Generator().manual_seed(0)) for f in MAP_FAMILIES}
    for s in maps.values():
        assert s.shape == (4, 16, 14, 14) and s.dtype == torch.float32
    assert (maps["positive"] >= 0).all()
    assert (maps["signed_iid"] < 0).any() and (maps["signed_smooth"] < 0).any()
    # i.i.d. neighbours are uncorrelated (measured -0.001), the 5 x 5 average makes adjacent
    # cells share 20 of their 25 draws (measured 0.83); unit spread after the rescale
    assert abs(_neighbour_correlation(maps["signed_iid"])) < 0.05
    assert _neighbour_correlation(maps["signed_smooth"]) > 0.6
    assert abs(float(maps["signed_smooth"].std()) - 1) < 1e-5
    # the same generator state gives the same draw: positive is |signed i.i.d.|
    assert torch.equal(maps["positive"], maps["signed_iid"].abs())


def test_unknown_family_is_named():
    with pytest.raises(ValueError, match="family must be one of"):
        semantic_maps("gaussian", 1, 1, 2, 2)
