import pytest
import torch

from kd_nb.projectors import (FACTORS, NO_PROJECTOR, PROJECTORS, ConvRegProjector, align_spatial, check_projector, list_projectors,
                              projector_choices,
                              make_projector, projector_knobs)


def n_params(m): return sum(p.numel() for p in m.parameters())


def widths(name):
    "A 128 -> 256 projection, or 128 -> 128 for a projector that keeps the width (identity)."
    try: make_projector(name, 128, 256); return 128, 256
    except ValueError: return 128, 128


@pytest.mark.parametrize("name", list_projectors())
def test_shapes(name):
    "Every projector maps (B, C_in, H, W) to C_out channels, keeping the batch and either the map or one pooled position."
    cin, cout = widths(name)
    y = make_projector(name, cin, cout).train()(torch.randn(2, cin, 8, 8))
    assert y.shape in ((2, cout, 8, 8), (2, cout, 1, 1)), y.shape


@pytest.mark.parametrize("name", list_projectors())
def test_declared_knobs_are_the_ones_that_change_it(name):
    "A projector declares `factor` exactly when its factor changes what it builds (the results read this declaration)."
    cin, cout = widths(name)
    sizes = {n_params(make_projector(name, cin, cout, factor=f)) for f in FACTORS}
    assert (len(sizes) > 1) == ('factor' in projector_knobs(name))


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
    with pytest.raises(ValueError, match="valid: simkd"): projector_knobs("nope")


def test_align_spatial():
    big, small = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)
    s, t = align_spatial(big, small)
    assert t is small and torch.allclose(s, big.reshape(2, 3, 4, 2, 4, 2).mean((3, 5)), atol=1e-6)
    s, t = align_spatial(small, big)
    assert s is small and t.shape == (2, 3, 4, 4)


def test_convreg_parameters_match_the_reference():
    "conv (1x1 at equal size, with bias) + BN: 128*128 + 128 + 2*128; the bias-free conv3x3 projector has 147,712."
    p = make_projector("convreg", 128, 128, in_size=(16, 16), out_size=(16, 16))
    assert n_params(p) == 16_768
    assert n_params(make_projector("convreg", 128, 128)) == 16_768
    assert n_params(make_projector("conv3x3", 128, 128)) == 147_712
    assert [k for k in p.state_dict()] == ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean",
                                           "bn.running_var", "bn.num_batches_tracked"]
    assert isinstance(p.relu, torch.nn.ReLU)


@pytest.mark.parametrize("in_size, out_size, conv, kernel, stride", [
    ((8, 8), (8, 8), torch.nn.Conv2d, (1, 1), (1, 1)),             # equal sizes
    ((16, 16), (8, 8), torch.nn.Conv2d, (3, 3), (2, 2)),           # student twice as large
    ((4, 4), (8, 8), torch.nn.ConvTranspose2d, (4, 4), (2, 2)),    # student half as large
    ((7, 6), (4, 4), torch.nn.Conv2d, (4, 3), (1, 1)),             # otherwise: (1+Hs-Ht) x (1+Ws-Wt)
])
def test_convreg_kernel_cases(in_size, out_size, conv, kernel, stride):
    p = make_projector("convreg", 32, 64, in_size=in_size, out_size=out_size).train()
    assert type(p.conv) is conv and p.conv.kernel_size == kernel and p.conv.stride == stride
    assert p.conv.bias is not None
    y = p(torch.randn(2, 32, *in_size))
    assert y.shape == (2, 64, *out_size) and (y >= 0).all()


def test_convreg_refuses_a_smaller_student_that_is_not_half():
    with pytest.raises(ValueError, match="cannot map a 4x4 map to 6x6"):
        make_projector("convreg", 8, 8, in_size=(4, 4), out_size=(6, 6))
    with pytest.raises(ValueError, match="cannot map a 2x2 map to 8x8"):
        make_projector("convreg", 8, 8, in_size=(2, 2), out_size=(8, 8))
    assert ConvRegProjector.supports((2, 2), (4, 4)) and not ConvRegProjector.supports((2, 2), (8, 8))


def test_sizes_are_optional_and_only_convreg_resizes():
    x = torch.randn(2, 16, 8, 8)
    for name in [n for n in list_projectors() if n not in ("identity", "mlp")]:
        assert make_projector(name, 16, 32, 2, (8, 8), (8, 8)).train()(x).shape == (2, 32, 8, 8), name
        assert make_projector(name, 16, 32, 2).train()(x).shape == (2, 32, 8, 8), name   # the old call still works
    with pytest.raises(ValueError, match="keeps the spatial size.*convreg"):
        make_projector("simkd", 16, 32, in_size=(8, 8), out_size=(4, 4))
    with pytest.raises(ValueError, match="in_size: must be"):
        make_projector("convreg", 16, 32, in_size=8)


def test_check_projector():
    for name in list_projectors():
        for f in FACTORS: check_projector(name, f)
    with pytest.raises(ValueError, match=f"^projector: unknown 'bottleneck'; valid: {', '.join(list_projectors())}, none$"):
        check_projector("bottleneck")
    with pytest.raises(ValueError, match=r"^projector_t: unknown 'x'"):
        check_projector("x", knob="projector_t")
    for bad in (3, 16, 2.0, True, "2"):
        with pytest.raises(ValueError, match=r"^factor: got .*; valid: 1, 2, 4, 8$"):
            check_projector("simkd", bad)
    with pytest.raises(ValueError, match="factor: got 3"):
        make_projector("linear", 8, 8, factor=3)       # make_projector validates through check_projector


def test_none_is_a_choice_of_the_knob_but_no_module():
    "'none' (no projector on either side) passes the knob's check and takes no knob; there is no module to make."
    assert projector_choices() == [*list_projectors(), NO_PROJECTOR] and NO_PROJECTOR == 'none' and 'none' not in PROJECTORS
    for f in FACTORS: check_projector('none', f)
    assert projector_knobs('none') == ()
    with pytest.raises(ValueError, match=r"^projector 'none' builds no module \(each side reaches the loss at its own width\); valid: simkd, identity"):
        make_projector('none', 64, 256)
    with pytest.raises(ValueError, match="or 'none' for a loss that takes each side at its own width"):
        make_projector('identity', 64, 256)
