import pytest
import torch
import torch.nn as nn

from kd_nb.distill import (DIRECTIONS, LAYER_SCHEDULES, METHOD_DEFAULTS, Alignment, Distiller, aux_parameters,
                           default_loss_weights, deployable, make_distiller, schedule_weights, stage_pairs, step_inputs,
                           student_parameters, trained_modules)
from kd_nb.losses import LOSSES, list_losses
from kd_nb.models import count_params, get_model
from kd_nb.projectors import ConvRegProjector


@pytest.fixture(scope='module')
def teacher():
    torch.manual_seed(0)
    return get_model('resnet8x4', num_classes=10)   # stage widths 32, 64, 128, 256


def student():
    return get_model('resnet8', num_classes=10)     # stage widths 16, 16, 32, 64


def ids(params): return [id(p) for p in params]


# --- the teacher-side projector trains; the frozen teacher does not

@pytest.mark.parametrize('direction', ['down', 'middle'])
def test_teacher_side_projector_trains(direction, teacher):
    torch.manual_seed(0)
    d = make_distiller('simkd', student(), teacher, direction=direction, ce_weight=1.0).train()
    q = d.alignments[0].teacher_proj
    assert q is not None and count_params(q) > 0
    before = [p.detach().clone() for p in q.parameters()]
    opt = torch.optim.SGD(student_parameters(d), lr=0.1)
    out = d.step(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    opt.zero_grad()
    out.total.backward()
    opt.step()
    for (name, p), b in zip(q.named_parameters(), before):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert not torch.equal(p.detach(), b), name
    assert all(p.grad is None for p in d.teacher.parameters())
    assert not d.teacher.training


def test_up_direction_target_is_the_frozen_teacher(teacher):
    d = make_distiller('simkd', student(), teacher)
    out = d.step(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    (s, t, _), = out.aligned
    assert s.requires_grad and not t.requires_grad


# --- FitNet's regressor

def test_fitnet_default_projector_is_the_reference_regressor():
    assert METHOD_DEFAULTS['fitnet']['projector'] == 'convreg'
    torch.manual_seed(0)
    d = make_distiller('fitnet', get_model('resnet8x4'), get_model('resnet8x4'))   # stage 3: 128 x 16 x 16 on both sides
    reg = d.alignments[0].student_proj
    assert isinstance(reg, ConvRegProjector)
    assert reg.conv.kernel_size == (1, 1) and reg.conv.bias is not None
    assert count_params(reg) == 16_768
    assert deployable(d).projector_params == 16_768


@pytest.mark.parametrize('s_shape, t_shape, in_hw, hw, conv, kernel', [
    ((32, 16, 16), (64, 8, 8), (16, 16), (8, 8), nn.Conv2d, (3, 3)),            # student twice: stride-2 3x3
    ((32, 4, 4), (64, 8, 8), (4, 4), (8, 8), nn.ConvTranspose2d, (4, 4)),       # student half: transposed 4x4
    ((32, 7, 7), (64, 4, 4), (7, 7), (4, 4), nn.Conv2d, (4, 4)),                # otherwise larger: (1+3) x (1+3)
    ((32, 8, 8), (64, 8, 8), (8, 8), (8, 8), nn.Conv2d, (1, 1)),                # equal
    ((32, 2, 2), (64, 8, 8), (2, 2), (2, 2), nn.Conv2d, (1, 1)),                # no regressor: teacher pooled to 2x2
])
def test_convreg_alignment_up(s_shape, t_shape, in_hw, hw, conv, kernel):
    al = Alignment(4, s_shape, t_shape, 'convreg').train()
    assert (al.in_hw, al.hw) == (in_hw, hw)
    assert type(al.student_proj.conv) is conv and al.student_proj.conv.kernel_size == kernel
    f_s, f_t = torch.randn(2, *s_shape), torch.randn(2, *t_shape)
    s, t = al(f_s, f_t)
    assert s.shape == t.shape == (2, 64, *hw)
    if hw == tuple(t_shape[1:]):
        assert t is f_t                         # the teacher map is used at its own size


@pytest.mark.parametrize('direction', ['down', 'middle'])
def test_convreg_alignment_down_middle_pools_both_to_the_smaller_grid(direction):
    al = Alignment(3, (32, 16, 16), (64, 8, 8), 'convreg', direction=direction).train()
    assert al.in_hw == al.hw == (8, 8)
    projs = [p for p in (al.student_proj, al.teacher_proj) if isinstance(p, ConvRegProjector)]
    assert projs and all(p.conv.kernel_size == (1, 1) for p in projs)
    s, t = al(torch.randn(4, 32, 16, 16), torch.randn(4, 64, 8, 8))
    assert s.shape == t.shape and s.shape[-2:] == (8, 8)


# --- default loss weights

def test_default_loss_weights():
    assert default_loss_weights('simkd', ['l2']) == [1.0]
    assert default_loss_weights('fitnet', ['l2']) == [100.0]
    assert default_loss_weights('kd', ['kl']) == [0.9]
    assert default_loss_weights('simkd', ['at', 'sp', 'nst', 'rkd', 'kl']) == [1000.0, 3000.0, 50.0, 1.0, 0.9]
    assert default_loss_weights('kd', ['l2']) == [1.0]
    for m in METHOD_DEFAULTS:
        own = dict(METHOD_DEFAULTS[m]['losses'])
        for name in list_losses():
            assert default_loss_weights(m, [name]) == [own.get(name, LOSSES[name].default_weight)]
    with pytest.raises(ValueError, match=f"method: unknown 'crd'; valid: {', '.join(METHOD_DEFAULTS)}$"):
        default_loss_weights('crd', ['l2'])
    with pytest.raises(ValueError, match="loss: unknown 'huber'"):
        default_loss_weights('simkd', ['huber'])


def test_distiller_fills_missing_weights_and_keeps_explicit_ones(teacher):
    assert make_distiller('fitnet', student(), teacher, losses=['l2', 'at']).weights == {'l2': 100.0, 'at': 1000.0}
    assert make_distiller('simkd', student(), teacher, losses=['at']).weights == {'at': 1000.0}
    assert make_distiller('simkd', student(), teacher, losses=[('at', 2.0), ('sp', None)]).weights == {'at': 2.0, 'sp': 3000.0}
    d = make_distiller('simkd', student(), teacher, layers=(3, 4), layer_losses=['nst', 'l2'])
    assert d.weights == {'l2': 1.0, 'nst': 50.0}
    d = make_distiller('fitnet', student(), teacher, layers=(3, 4), layer_losses=['l2', 'cosine'])
    assert d.weights == {'l2': 100.0, 'cosine': LOSSES['cosine'].default_weight}
    out = d.step(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
    assert set(out.terms) == {'ce', 'l2@3', 'cosine@4'}


# --- layer-weight schedules

@pytest.mark.parametrize('n', [1, 2, 3, 4])
def test_named_schedules_sum_to_one(n):
    for name in LAYER_SCHEDULES:
        assert sum(schedule_weights(name, n)) == pytest.approx(1.0)
    assert schedule_weights('uniform', n) == pytest.approx([1 / n] * n)
    assert schedule_weights('last_only', n) == [0.0] * (n - 1) + [1.0]


def test_schedule_shapes_and_explicit_lists():
    assert schedule_weights('increasing', 4) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert schedule_weights('decreasing', 4) == pytest.approx([0.4, 0.3, 0.2, 0.1])
    assert schedule_weights([2, 0, 1], 3) == [2.0, 0.0, 1.0]
    with pytest.raises(ValueError, match='>= 0'):
        schedule_weights([1, -1], 2)


def test_zero_weight_stages_are_not_built(teacher):
    one = make_distiller('simkd', student(), teacher)
    last = make_distiller('simkd', student(), teacher, layers=(2, 3, 4), layer_weights='last_only')
    assert [a.stage for a in last.alignments] == [4] and len(last.feature_losses) == 1
    assert count_params(last) == count_params(one)
    assert deployable(last).projector_params == deployable(one).projector_params
    d = make_distiller('simkd', student(), teacher, layers=(2, 3, 4), layer_weights=[1, 0, 1], losses=['l2', 'adversarial'])
    assert [a.stage for a in d.alignments] == [2, 4]
    assert len(aux_parameters(d)) == 2 * len(list(d.feature_losses[0]['adversarial'].parameters()))
    fit = make_distiller('fitnet', student(), teacher, layers=(2, 3), layer_weights=[0, 1])
    assert [a.stage for a in fit.alignments] == [3]
    assert deployable(fit).projector_params == count_params(fit.alignments[0].student_proj)
    with pytest.raises(ValueError, match='all weights'):
        make_distiller('fitnet', student(), teacher, layers=(2, 3), layer_weights=[0, 0])


def test_reused_head_stage_with_zero_weight_keeps_only_its_student_side(teacher):
    d = make_distiller('simkd', student(), teacher, layers=(3, 4), layer_weights=[1, 0], direction='down', ce_weight=1.0)
    head_stage = d.alignments[-1]
    assert head_stage.stage == 4 and head_stage.teacher_proj is None and not d.feature_losses[-1]
    out = d.step(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert set(out.terms) == {'ce', 'l2@3'}


# --- what trains

def test_student_parameters_come_from_trained_modules(teacher):
    d = make_distiller('simkd', student(), teacher, losses=['l2', 'adversarial'], direction='middle', ce_weight=1.0)
    mods = trained_modules(d)
    main, aux, frozen = ids(student_parameters(d)), ids(aux_parameters(d)), ids(d.teacher.parameters())
    assert main == ids(nn.ModuleList(mods).parameters())
    assert aux and not set(aux) & set(main) and not set(frozen) & set(main)
    assert sorted(main + aux + frozen) == sorted(ids(d.parameters()))
    assert set(ids(d.alignments[0].teacher_proj.parameters())) <= set(main)


def test_one_home_for_what_trains(teacher, monkeypatch):
    "The trainer registers the distiller's `trained_modules` with DDP/compile: the same function, not a copy."
    from kd_nb import trainer
    assert trainer.trained_modules is trained_modules
    d = make_distiller('simkd', student(), teacher, losses=['l2', 'adversarial'])
    assert list(trainer.TrainStep(d).parts) == trained_modules(d)
    monkeypatch.setattr(trainer, 'trained_modules', lambda distiller: [distiller.student])
    assert list(trainer.TrainStep(d).parts) == [d.student]      # TrainStep reads the function, it keeps no list of its own


# --- every registered loss and method, without naming them

INPUTS = {'indices': torch.tensor([5, 0, 9, 3]), 'progress': torch.tensor(0.5)}   # the step inputs a run passes


@pytest.mark.parametrize('name', list_losses())
def test_every_loss_trains_the_student_through_a_distiller(name, teacher):
    "A logit loss under KD, a feature loss on SimKD's stage 4 (a stage loss with L2, which trains the projector): the step has the loss's term and its gradient reaches the student."
    torch.manual_seed(0)
    method = 'kd' if LOSSES[name].kind == 'logits' else 'simkd'
    same_widths = get_model('resnet8x4', num_classes=10) if LOSSES[name].kind == 'stages' else student()
    d = make_distiller(method, same_widths, teacher, losses=['l2', name] if LOSSES[name].kind == 'stages' else [name], num_samples=10).train()
    assert step_inputs(d) == {n for n in LOSSES[name].needs if n in INPUTS} | ({'labels'} & set(LOSSES[name].needs))
    out = d.step(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), **{n: INPUTS[n] for n in step_inputs(d) if n in INPUTS})
    assert any(k.split('@')[0] == name for k in out.terms) and torch.isfinite(out.total)
    out.total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters())


@pytest.mark.parametrize('method', list(METHOD_DEFAULTS))
def test_every_method_steps_and_deploys(method, teacher):
    d = make_distiller(method, student(), teacher).train()
    out = d.step(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert out.logits.shape == (4, 10) and torch.isfinite(out.total)
    terms = ({'ce'} if d.ce_weight else set()) | {n if LOSSES[n].kind == 'logits' else f'{n}@{k}'
                                                 for n, _ in METHOD_DEFAULTS[method]['losses'] for k in d.layers or [None]}
    if hasattr(d, 'peers'): terms = {f'{t}_peer{k + 1}' for t in terms for k in range(len(d.peers))}   # mutual learning: per peer
    assert set(out.terms) == terms
    assert deployable(d).module(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# --- the losses that read two stages, and the inputs a step is given

def test_stage_pairs():
    assert stage_pairs((1, 2, 3, 4)) == [None, (1, 2), (2, 3), (3, 4)]     # RepDistiller's FSP pairs
    assert stage_pairs((4,)) == [(3, 4)] and stage_pairs((2, 4)) == [(1, 2), (2, 4)] and stage_pairs(()) == []


def test_fsp_reads_the_raw_stage_maps_of_both_networks(teacher):
    torch.manual_seed(0)
    s8x4 = get_model('resnet8x4', num_classes=10)
    d = make_distiller('fitnet', s8x4, teacher, losses=['fsp'], layers=(1, 2, 3, 4), ce_weight=1.0).train()
    assert not d.alignments and not list(d.stage_losses.parameters()) and d.stage_pairs == [(1, 2), (2, 3), (3, 4)]
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    out = d.step(x, y)
    assert set(out.terms) == {'ce', 'fsp@2', 'fsp@3', 'fsp@4'}
    fs, ft = s8x4.forward_features(x).stages, teacher.forward_features(x).stages
    fsp = LOSSES['fsp']()
    assert torch.allclose(out.terms['fsp@3'], 50.0 * 0.25 * fsp((fs[1], fs[2]), (ft[1], ft[2])), rtol=1e-5)
    out.total.backward()
    assert s8x4.layer1[0].conv1.weight.grad.abs().sum() > 0
    assert deployable(d).projector_params == 0
    # per layer, next to an aligned loss; only stages with a term are built
    d = make_distiller('simkd', get_model('resnet8x4', num_classes=10), teacher, layers=(3, 4), layer_losses=['fsp', 'l2'])
    assert [a.stage for a in d.alignments] == [4] and d.stage_pairs == [(2, 3)]
    assert set(d.step(x, y).terms) == {'fsp@3', 'l2@4'} and d.weights == {'fsp': 50.0, 'l2': 1.0}
    with pytest.raises(ValueError, match=r"fsp: stages 3->4 are 32->64 channels wide in the student and 128->256 in the teacher"):
        make_distiller('simkd', student(), teacher, losses=['fsp'])
    with pytest.raises(ValueError, match=r"layers: fsp compares two stages, and layers \(1,\) give no pair"):
        make_distiller('fitnet', get_model('resnet8x4', num_classes=10), teacher, losses=['fsp'], layers=(1,))


def test_a_missing_step_input_is_named(teacher):
    d = make_distiller('kd', student(), teacher, losses=['dkd'])
    assert step_inputs(d) == {'labels', 'progress'}
    with pytest.raises(ValueError, match="loss 'dkd': needs progress at every step"):
        d.step(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="loss 'crd': needs num_samples, which this run does not supply"):
        make_distiller('simkd', student(), teacher, losses=['crd'])
    d = make_distiller('simkd', student(), teacher, losses=['crd'], num_samples=10)
    with pytest.raises(ValueError, match="loss 'crd': needs indices at every step"):
        d.step(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))


def test_dkd_warms_up_with_progress(teacher):
    torch.manual_seed(0)
    d = make_distiller('kd', student(), teacher, losses=['dkd']).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    term = lambda p: d.step(x, y, progress=torch.tensor(p)).terms['dkd'].item()
    assert term(0.0) == 0 and term(10 / 240) == pytest.approx(term(1.0) / 2, rel=1e-5) and term(20 / 240) == pytest.approx(term(1.0))


@pytest.mark.parametrize('name', ['vid', 'cc', 'crd'])
def test_loss_heads_train_with_the_student_and_are_not_deployed(name, teacher):
    "The regressor and variance of VID, the embeddings of CC and CRD: in the main optimizer, never in the deployed cost."
    torch.manual_seed(0)
    d = make_distiller('fitnet', student(), teacher, losses=[name], num_samples=10, layers=(3, 4), ce_weight=1.0)
    heads = [l for losses in d.feature_losses for l in losses.values()]
    assert heads and all(l in trained_modules(d) for l in heads)
    main = ids(student_parameters(d))
    assert all(id(p) in main for l in heads for p in l.parameters())
    alone = make_distiller('fitnet', student(), teacher, losses=['l2'], layers=(3, 4), ce_weight=1.0)
    assert count_params(d) - count_params(alone) == sum(count_params(l) for l in heads) > 0
    dep, ref = deployable(d), deployable(alone)
    assert (dep.params, dep.flops, dep.projector_params) == (ref.params, ref.flops, ref.projector_params)
    out = d.step(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), indices=torch.tensor([1, 2, 3, 4]))
    out.total.backward()
    assert all(p.grad is not None for l in heads for p in l.parameters())


# --- no projector: CRD on a pair of different widths, each side embedded from its own width

def test_crd_without_projector_on_a_pair_of_different_widths(teacher):
    "resnet8x4 (stage 4: 256 channels) into resnet8 (64): projector 'none' leaves the student unprojected, CRD embeds 64 and 256 channels to 128."
    torch.manual_seed(0)
    s = student()
    d = make_distiller('kd', s, teacher, losses=[('crd', 0.8), ('kl', 1.0)], ce_weight=1.0, layers=(4,), projector='none', num_samples=16)
    al, crd = d.alignments[0], d.feature_losses[0]['crd']
    assert al.widths == (64, 256) and al.width is None and isinstance(al.student_proj, nn.Identity) and al.teacher_proj is None
    assert (crd.embed_s.weight.shape, crd.embed_t.weight.shape) == ((128, 64), (128, 256))
    assert deployable(d).projector_params == 0 and all(l in trained_modules(d) for l in (crd,))
    opt = torch.optim.SGD(student_parameters(d), lr=0.1)
    x, y, idx = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), torch.tensor([5, 6, 7, 8])
    out = d.train().step(x, y, indices=idx)
    assert set(out.terms) == {'ce', 'kl', 'crd@4'} and [t.shape[1] for t in out.aligned[0][:2]] == [64, 256]
    before = [p.detach().clone() for p in (*crd.parameters(), *s.parameters())]
    opt.zero_grad(); out.total.backward(); opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, (*crd.parameters(), *s.parameters())) if p.grad is not None)
    assert all(p.grad is not None for p in crd.parameters()) and all(p.grad is None for p in teacher.parameters())


def test_no_projector_trains_a_run_end_to_end(tmp_path):
    "One epoch of CRD + KD on the second pair's shapes, with no projector, through the trainer."
    from kd_nb.data import DeviceLoader
    from kd_nb.trainer import TrainConfig, fit
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(16) % 10
    loader = lambda train: DeviceLoader(images, labels, 8, (0.5,) * 3, (0.25,) * 3, train)
    torch.manual_seed(0)
    d = make_distiller('kd', student(), get_model('resnet8x4', num_classes=10), losses=[('crd', 0.8), ('kl', 1.0)], ce_weight=1.0,
                       layers=(4,), projector='none', num_samples=16, loss_options={'crd': {'nce_k': 8}})
    history = fit(d, loader(True), loader(False), TrainConfig(epochs=1, lr_milestones=(), progress=False, compile='off'), tmp_path, log=lambda *a: None)
    assert history[0]['train_crd@4'] > 0 and history[0]['train_kl'] > 0


def test_no_projector_refuses_what_needs_one_width(teacher):
    "A loss that compares maps of one width, a reused head, or a teacher-side direction: each refused by name where the widths differ."
    with pytest.raises(ValueError, match=r"projector: 'none' leaves stage 4 64 channels wide in the student and 256 in the teacher, "
                                         r"and l2, adversarial compares maps of one width; valid: a projector that maps the widths \(simkd, linear"):
        make_distiller('kd', student(), teacher, losses=['crd', 'l2', 'adversarial'], layers=(4,), projector='none', num_samples=8)
    with pytest.raises(ValueError, match="reused teacher head reads 256; valid: a projector that maps the widths"):
        make_distiller('simkd', student(), teacher, losses=['rkd'], projector='none')
    with pytest.raises(ValueError, match="direction: 'middle' projects the teacher's map, and projector 'none' projects neither side"):
        make_distiller('kd', student(), teacher, losses=['crd'], layers=(4,), projector='none', direction='middle', num_samples=8)
    for name in ('rkd', 'pkt', 'cc', 'vid', 'at'):   # the other losses that take each side at its own width run too
        d = make_distiller('kd', student(), teacher, losses=[name], layers=(4,), projector='none')
        assert torch.isfinite(d.train().step(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])).total)


# --- CRD's memory bank is part of the run's checkpoint

def test_crd_bank_and_metrics_resume_exactly(tmp_path):
    "A run of CRD (sample indices) and DKD (progress) killed after epoch 1 and resumed ends as the uninterrupted run: same bank, same metrics."
    from kd_nb.data import DeviceLoader
    from kd_nb.trainer import TrainConfig, fit, trainable_state
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(24) % 10
    loader = lambda train: DeviceLoader(images, labels, 8, (0.5,) * 3, (0.25,) * 3, train)
    cfg = TrainConfig(epochs=2, lr_milestones=(1,), progress=False, compile='off')

    class Killed(Exception): pass

    def run(run_dir, kill_after=None):
        torch.manual_seed(0)
        d = make_distiller('fitnet', get_model('resnet8', num_classes=10), get_model('resnet8', num_classes=10),
                           losses=['crd', 'dkd'], layers=(4,), num_samples=24, loss_options={'crd': {'nce_k': 16}})
        def stop(epoch, row):
            if epoch == kill_after: raise Killed
        try: history = fit(d, loader(True), loader(False), cfg, run_dir, log=lambda *a: None, on_epoch_end=stop)
        except Killed: return None, d
        return history, d

    whole, d_whole = run(tmp_path / 'whole')
    assert run(tmp_path / 'cut', kill_after=1)[0] is None
    resumed, d_resumed = run(tmp_path / 'cut')
    timing = ('epoch_time_s', 'images_per_s')
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed] == [{k: v for k, v in r.items() if k not in timing} for r in whole]
    assert whole[1]['train_crd@4'] > 0 and whole[0]['train_dkd'] > 0
    bank = lambda d: d.feature_losses[0]['crd'].memory
    assert torch.equal(bank(d_resumed).memory_s, bank(d_whole).memory_s) and torch.equal(bank(d_resumed).z, bank(d_whole).z)
    state = torch.load(tmp_path / 'cut' / 'last.pt', weights_only=False)['distiller']
    assert torch.equal(state['feature_losses.0.crd.memory.memory_t'], bank(d_whole).memory_t)
    assert {k for k in trainable_state(d_whole) if k.startswith('feature_losses.0.crd.memory.')} == \
        {f'feature_losses.0.crd.memory.{b}' for b in ('memory_s', 'memory_t', 'z')}
