import pytest
import torch

from kd_nb.projectors import PROJECTORS, align_spatial, list_projectors, make_projector


def n_params(m): return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", [n for n in list_projectors() if n != "identity"])
def test_shapes(name):
    y = make_projector(name, 128, 256).train()(torch.randn(2, 128, 8, 8))
    assert y.shape == ((2, 256, 1, 1) if name == "mlp" else (2, 256, 8, 8))


@pytest.mark.parametrize("factor,expected", [(1, 722_432), (2, 214_016), (4, 70_400), (8, 26_240)])
def test_simkd_params(factor, expected):
    p = make_projector("simkd", 256, 256, factor=factor)
    assert n_params(p) == expected
    assert all(k.startswith("transfer.") for k in p.state_dict())


def test_bad_input():
    with pytest.raises(ValueError, match="valid: simkd"): make_projector("nope", 8, 8)
    with pytest.raises(ValueError, match="in=64 out=256"): make_projector("identity", 64, 256)
    with pytest.raises(ValueError, match="factor"): make_projector("simkd", 8, 8, factor=3)
    with pytest.raises(ValueError, match="in_channels"): make_projector("linear", 0, 8)
    assert set(PROJECTORS) == set(list_projectors())


def test_align_spatial():
    big, small = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)
    s, t = align_spatial(big, small)
    assert t is small and torch.allclose(s, big.reshape(2, 3, 4, 2, 4, 2).mean((3, 5)), atol=1e-6)
    s, t = align_spatial(small, big)
    assert s is small and t.shape == (2, 3, 4, 4)
