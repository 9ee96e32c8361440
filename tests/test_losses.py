import copy

import pytest
import torch

from kd_nb.losses import (KINDS, LOSSES, MEASURED_WEIGHT, NEEDS, build_loss, check_loss, check_options, get_loss,
                          grad_norm_ratios, list_losses, loss_options, register_loss, step_needs, takes_own_widths, AlignmentLoss)
from kd_nb.models import get_model

NAMES = list_losses()       # every registered loss is tested here without naming it
DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
BATCH, CLASSES, CHANNELS = 8, 10, 8
RUN = {'channels': CHANNELS, 'student_channels': CHANNELS, 'teacher_channels': CHANNELS, 'num_classes': CLASSES, 'num_samples': 64, **{n: None for n, need in NEEDS.items() if need.when == 'step'}}


def build(name): return build_loss(name, run=RUN)


def step_inputs(loss, device='cpu') -> dict:
    "The per-batch inputs `loss` declares, for a batch of `BATCH` samples."
    values = {'labels': lambda: torch.arange(BATCH, device=device) % CLASSES, 'indices': lambda: torch.arange(BATCH, device=device),
              'progress': lambda: 0.5, 'teacher': lambda: get_model('resnet8', CLASSES).to(device)}
    return {n: values[n]() for n in step_needs(loss)}


def pair(name, device='cpu', dtype=torch.float32, seed=0):
    "Student and teacher inputs of loss `name`: logits, maps, or (for `kind='stages'`) a pair of maps each."
    g = torch.Generator().manual_seed(seed)
    shapes = {'logits': [(BATCH, CLASSES)], 'feature': [(BATCH, CHANNELS, 4, 4)],
              'stages': [(BATCH, CHANNELS, 8, 8), (BATCH, 2 * CHANNELS, 4, 4)]}[LOSSES[name].kind]
    side = lambda: [torch.randn(sh, generator=g).to(device, dtype) for sh in shapes]
    s, t = side(), side()
    return (tuple(s), tuple(t)) if LOSSES[name].kind == 'stages' else (s[0], t[0])


def tensors(x): return x if isinstance(x, tuple) else (x,)
def apply(f, x): return tuple(map(f, x)) if isinstance(x, tuple) else f(x)


def value(loss, s, t, device='cpu', seed=0):
    "`loss(s, t)` with its step inputs, from a copy of `loss` and the random generator seeded: a loss with state (a memory bank, random negatives) gives the same value twice."
    torch.manual_seed(seed)
    return copy.deepcopy(loss)(s, t, **step_inputs(loss, device))


@pytest.mark.parametrize('name', NAMES)
def test_registry_declarations(name):
    "Each loss states what it needs from the known `NEEDS`, its kind, its weight and source; `aux_loss` exactly when it needs its own optimizer."
    loss = build(name)
    assert set(loss.needs) <= set(NEEDS) and loss.kind in KINDS and loss.name == name
    assert loss.default_weight > 0 and loss.weight_source and type(loss).__doc__
    assert callable(getattr(loss, 'aux_loss', None)) == ('own_optimizer' in loss.needs)
    assert not set(loss_options(name)) & set(loss.needs)
    if any(True for _ in loss.parameters()): assert {'trainable', 'own_optimizer'} & set(loss.needs)


def test_errors_name_the_choices():
    with pytest.raises(ValueError, match=f"valid: {', '.join(list_losses())}$"):
        get_loss('mse')
    with pytest.raises(ValueError, match=r"loss 'cosine': unknown option\(s\) T; valid: mode"):
        get_loss('cosine', T=2)
    with pytest.raises(ValueError, match='missing required option'):
        get_loss('adversarial')
    with pytest.raises(ValueError, match='mode'):
        get_loss('cosine', mode='sideways')
    with pytest.raises(ValueError, match="needs channels, which this run does not supply"):
        build_loss('adversarial')


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('name', NAMES)
def test_scalar_float32_and_target_differentiable(name, device):
    "A loss detaches nothing: a target that requires grad (a trainable projection of the teacher) gets the gradient."
    loss = build(name).to(device)
    s, t = pair(name, device)
    for x in tensors(s) + tensors(t): x.requires_grad_()
    v = value(loss, s, t, device)
    v.backward()
    assert v.shape == () and v.dtype == torch.float32 and torch.isfinite(v)
    assert all(torch.isfinite(x.grad).all() for x in tensors(s))
    if 'own_optimizer' in loss.needs: return   # a generator loss against its own discriminator: t trains the discriminator
    assert all(x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in tensors(t))
    if not loss.optimum_at_equality: return    # learned heads between the inputs and the comparison
    with torch.no_grad():   # matching the teacher is never worse than an unrelated student
        assert value(loss, t, t, device).item() <= value(loss, s, t, device).item() + 1e-6


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('name', NAMES)
def test_autocast_low_precision_inputs(name, device):
    dtype = torch.bfloat16 if device == 'cpu' else torch.float16
    loss = build(name).to(device)
    s, t = pair(name, device, dtype)
    with torch.autocast(device, dtype=dtype):
        low = value(loss, s, t, device)
    assert low.dtype == torch.float32
    ref = value(loss, apply(torch.Tensor.float, s), apply(torch.Tensor.float, t), device)
    assert torch.allclose(low, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', NAMES)
def test_channels_last_inputs(name):
    "A channels-last map (the fast path's memory format) gives the value of the contiguous one."
    loss = build(name)
    s, t = pair(name)
    cl = lambda x: x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x
    assert torch.allclose(value(loss, apply(cl, s), apply(cl, t)), value(loss, s, t), rtol=1e-5, atol=1e-6)


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


@pytest.mark.parametrize('name', [n for n in list_losses('feature') if LOSSES[n].match != 'shape'])
def test_losses_that_need_no_projector(name):
    "A loss whose `match` is looser than the whole shape accepts a student with fewer channels than the teacher (its heads built for both widths)."
    loss = build_loss(name, run={**RUN, 'student_channels': 3})
    assert takes_own_widths(name)
    assert torch.isfinite(loss(torch.randn(BATCH, 3, 4, 4), torch.randn(BATCH, CHANNELS, 4, 4), **step_inputs(loss)))


@pytest.mark.parametrize('name', [n for n in NAMES if {'student_channels', 'teacher_channels'} & set(LOSSES[n].needs)])
def test_heads_are_built_from_each_sides_width(name):
    "A loss that embeds each side by itself (CRD, CC, VID) is built for a student width and a teacher width, and refuses other widths by name."
    loss = build_loss(name, run={**RUN, 'student_channels': 64, 'teacher_channels': 256})
    assert loss.widths == (64, 256)
    s, t = torch.randn(BATCH, 64, 4, 4, requires_grad=True), torch.randn(BATCH, 256, 4, 4)
    v = loss(s, t, **step_inputs(loss))
    v.backward()
    assert torch.isfinite(v) and s.grad.abs().sum() > 0 and all(p.grad is not None for p in loss.parameters())
    with pytest.raises(ValueError, match=f"{name}: student features have 256 channels; the loss was built for student_channels=64"):
        loss(t, t, **step_inputs(loss))


@pytest.mark.parametrize('name', [n for n in list_losses('feature') if LOSSES[n].match == 'shape'])
def test_shape_mismatch_is_a_value_error(name):
    loss = build(name)
    with pytest.raises(ValueError, match='must match'):
        loss(torch.randn(BATCH, 3, 4, 4), torch.randn(BATCH, CHANNELS, 4, 4), **step_inputs(loss))


def test_trainable_target_learns_through_the_loss():
    "The teacher-side projection of the down/middle directions must get gradient; a frozen target (no_grad) stays constant."
    torch.manual_seed(0)
    proj = torch.nn.Conv2d(8, 8, 1)
    s, f_t = torch.randn(8, 8, 4, 4, requires_grad=True), torch.randn(8, 8, 4, 4)
    for name in ('l2', 'cosine', 'at', 'cka'):
        proj.zero_grad()
        get_loss(name)(s, proj(f_t)).backward()
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0, name


def test_published_default_weights_are_their_papers():
    "Each published weight is the one its source names (the measured ones are checked against l2 below)."
    assert LOSSES['rkd']().w_dist == 25 and LOSSES['rkd']().w_angle == 50 and LOSSES['at']().p == 2
    published = {'l2': 1.0, 'kl': 0.9, 'at': 1000.0, 'sp': 3000.0, 'nst': 50.0, 'rkd': 1.0,
                 'pkt': 30000.0, 'vid': 1.0, 'cc': 0.02, 'crd': 0.8, 'fsp': 50.0, 'dkd': 1.0}
    for name, weight in published.items():
        assert LOSSES[name].default_weight == weight and LOSSES[name].weight_source != MEASURED_WEIGHT, name
    for name, ref in [('at', '1000'), ('sp', '3000'), ('nst', '50'), ('rkd', '-b 1'), ('kl', '0.9'), ('l2', 'SimKD'),
                      ('pkt', '-b 30000'), ('vid', '-b 1'), ('cc', '-b 0.02'), ('crd', '-b 0.8'), ('fsp', '-b 50'),
                      ('dkd', 'mdistiller configs/cifar100/dkd')]:
        assert ref in LOSSES[name].weight_source, name
    widths = dict(student_channels=4, teacher_channels=4)
    dkd, crd, vid = LOSSES['dkd'](), LOSSES['crd'](**widths, num_samples=10), LOSSES['vid'](**widths)
    assert (dkd.alpha, dkd.beta, dkd.T, dkd.warmup) == (1.0, 8.0, 4.0, 20 / 240)
    assert (crd.memory.k, crd.memory.t, crd.memory.m, crd.embed_s.out_features) == (16384, 0.07, 0.5, 128)
    assert LOSSES['cc'](**widths).embed_s.out_features == 128
    assert torch.allclose(vid.variance(), torch.full((4,), 5.0))


def test_a_loss_without_default_weight_cannot_register():
    class Unweighted(AlignmentLoss):
        def compute(self, s, t): return (s - t).abs().mean()
    with pytest.raises(ValueError, match='default_weight'):
        register_loss('unweighted')(Unweighted)
    assert 'unweighted' not in LOSSES


def test_measured_default_weights_match_the_gradient_norm_of_l2():
    "SimKD setting, seed 0: each measured weight is within the 1-2-5 rounding (a factor 1.6) of the l2-matched weight."
    from kd_nb.projectors import make_projector
    torch.manual_seed(0)
    teacher, student = get_model('resnet32x4').eval(), get_model('resnet8x4').train()
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f_t, f_s = teacher.forward_features(x).final, student.forward_features(x).final
    measured = sorted(n for n, c in LOSSES.items() if c.weight_source == MEASURED_WEIGHT)
    assert {'adversarial', 'cka', 'cosine', 'emd', 'l1', 'mmd', 'smooth_l1'} <= set(measured)
    ratios = grad_norm_ratios(f_s, f_t, make_projector('simkd', 256, 256).train(), names=measured + ['l2'])
    assert ratios['l2'] == pytest.approx(1.0)
    for name in measured:
        assert 1 / 1.6 <= LOSSES[name].default_weight / ratios[name] <= 1.6, (name, ratios[name])


def test_grad_norm_ratios_on_a_known_case():
    "l1 on a difference of +-1 everywhere: grad l2 = 2(s-t)/N, grad l1 = sign(s-t)/N, so the ratio is 2."
    s, t = torch.zeros(4, 3, 2, 2), torch.ones(4, 3, 2, 2)
    assert grad_norm_ratios(s, t, names=['l1'])['l1'] == pytest.approx(2.0)
    assert grad_norm_ratios(2 * s, t, names=['l2'], reference='l1')['l2'] == pytest.approx(0.5)


def test_check_loss():
    check_loss('smooth_l1', {'beta': 0.5})
    check_loss('adversarial', {'hidden': 8})           # the distiller fills `channels`
    check_loss('kl')
    with pytest.raises(ValueError, match=r"adversarial': channels is filled by the run; valid: hidden"):
        check_loss('adversarial', {'channels': 8})
    with pytest.raises(ValueError, match=f"loss: unknown 'huber'; valid: {', '.join(list_losses())}$"):
        check_loss('huber')
    with pytest.raises(ValueError, match=r"layer_losses: unknown 'huber'"):
        check_loss('huber', knob='layer_losses')
    with pytest.raises(ValueError, match=r"loss 'smooth_l1': unknown option\(s\) gamma; valid: beta"):
        check_loss('smooth_l1', {'gamma': 1})
    with pytest.raises(ValueError, match=r"loss 'cosine': mode='sideways' is invalid; valid: position, pooled"):
        check_loss('cosine', {'mode': 'sideways'})
    with pytest.raises(ValueError, match=r"loss 'kl': T=0 is invalid; valid: a number > 0"):
        check_loss('kl', {'T': 0})
    with pytest.raises(ValueError, match=r"loss 'mmd': unbiased='yes' is invalid; valid: True, False"):
        check_loss('mmd', {'unbiased': 'yes'})
    with pytest.raises(ValueError, match=r"loss 'l2': unknown option\(s\) beta; valid: none"):
        check_loss('l2', {'beta': 1})


@pytest.mark.parametrize('name, bad', [('smooth_l1', dict(beta=-1)), ('cosine', dict(mode='x')), ('kl', dict(T=-2)),
                                       ('mmd', dict(scales=())), ('at', dict(p=0)), ('rkd', dict(w_dist=-1)),
                                       ('nst', dict(degree=0)), ('adversarial', dict(channels=0))])
def test_constructors_apply_the_same_rules(name, bad):
    (option, value), = bad.items()
    with pytest.raises(ValueError, match=f"loss '{name}': {option}="):
        LOSSES[name](**({'channels': 4} if name == 'adversarial' and option != 'channels' else {}), **bad)
    with pytest.raises(ValueError, match=f"{option}="):
        check_options(name, bad)
