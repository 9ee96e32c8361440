import inspect

import pytest
import torch

from kd_nb.losses import LOSSES, get_loss, list_losses, loss_options

NAMES = ['adversarial', 'at', 'cka', 'cosine', 'kl', 'l1', 'l2', 'mmd', 'nst', 'rkd', 'smooth_l1', 'sp']
DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


def build(name, channels=8):
    return get_loss(name, channels=channels, hidden=16) if name == 'adversarial' else get_loss(name)


def pair(name, device='cpu', dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (8, 10) if LOSSES[name].kind == 'logits' else (8, 8, 4, 4)
    return (torch.randn(shape, generator=g).to(device, dtype), torch.randn(shape, generator=g).to(device, dtype))


def test_registry_names_and_attributes():
    assert list_losses() == NAMES
    assert list_losses('logits') == ['kl']
    for name in NAMES:
        loss = build(name)
        assert loss.kind in ('feature', 'logits')
        assert loss.has_aux_step == (name == 'adversarial')
        assert callable(getattr(loss, 'aux_loss', None)) == loss.has_aux_step


def test_errors_name_the_choices():
    with pytest.raises(ValueError, match='valid: adversarial, at, cka, cosine, kl'):
        get_loss('mse')
    with pytest.raises(ValueError, match=r"loss 'cosine': unknown option\(s\) T; valid: mode"):
        get_loss('cosine', T=2)
    with pytest.raises(ValueError, match='missing required option'):
        get_loss('adversarial')
    with pytest.raises(ValueError, match='mode'):
        get_loss('cosine', mode='sideways')
    assert loss_options('adversarial')['channels'] is inspect.Parameter.empty


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('name', NAMES)
def test_scalar_float32_and_teacher_constant(name, device):
    loss = build(name).to(device)
    s, t = pair(name, device)
    s.requires_grad_(); t.requires_grad_()
    value = loss(s, t)
    value.backward()
    assert value.shape == () and value.dtype == torch.float32 and torch.isfinite(value)
    assert torch.isfinite(s.grad).all() and t.grad is None
    if name != 'adversarial':
        assert loss(t, t).abs().item() < 1e-5


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('name', NAMES)
def test_autocast_low_precision_inputs(name, device):
    dtype = torch.bfloat16 if device == 'cpu' else torch.float16
    loss = build(name).to(device)
    s, t = pair(name, device, dtype)
    with torch.autocast(device, dtype=dtype):
        low = loss(s, t)
    assert low.dtype == torch.float32
    ref = loss(s.float(), t.float())
    assert torch.allclose(low, ref, rtol=1e-5, atol=1e-6)


def test_adversarial_aux_step_trains_only_discriminator():
    torch.manual_seed(0)
    loss = get_loss('adversarial', channels=8, hidden=16)
    s, t = pair('adversarial')
    s = s.requires_grad_()
    loss(s, t).backward()
    assert all(p.grad is None for p in loss.parameters())
    opt = torch.optim.SGD(loss.parameters(), lr=0.1)
    before = loss.aux_loss(s.detach(), t).item()
    for _ in range(20):
        opt.zero_grad(); loss.aux_loss(s.detach(), t + 2).backward(); opt.step()
    assert loss.aux_loss(s.detach(), t + 2).item() < before


@pytest.mark.parametrize('name', ['at', 'nst', 'sp', 'cka', 'rkd'])
def test_losses_that_need_no_projector(name):
    s, t = torch.randn(8, 3, 4, 4), torch.randn(8, 8, 4, 4)
    assert torch.isfinite(get_loss(name)(s, t))


@pytest.mark.parametrize('name', ['l2', 'l1', 'smooth_l1', 'cosine', 'mmd'])
def test_shape_mismatch_is_a_value_error(name):
    with pytest.raises(ValueError, match='must match'):
        get_loss(name)(torch.randn(8, 3, 4, 4), torch.randn(8, 8, 4, 4))
