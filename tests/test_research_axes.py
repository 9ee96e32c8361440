"Integration: every loss, layer set, projector and direction runs through papermill (quick preset, CPU, synthetic data)."
import json, re
import pytest
from kd_nb.losses import LOSSES, list_losses
from kd_nb.projectors import list_projectors
from conftest import quick_params, executed_notebook
from test_run_experiment import run_notebook, SUMMARY_KEYS

pytestmark = pytest.mark.slow   # papermill or torchrun runs: `pytest -m 'not slow'` leaves them out

# resnet8x4 (stage widths 32, 64, 128, 256) teaches resnet8 (16, 16, 32, 64): every projector has work to do.
PAIR = dict(teacher='resnet8x4', student='resnet8', epochs=1, train_limit=128, test_limit=64)
AXES = (
    # a loss on two stages of each network compares their Gram matrices: it needs equal widths (resnet14's are resnet8's),
    # and L2 beside it to train the projector that feeds the reused head
    [dict(loss=name) if LOSSES[name].kind != 'stages' else dict(loss=f'l2+{name}', teacher='resnet14') for name in list_losses()]
    + [dict(loss='l2+kl', loss_weight='1,0.5')]
    + [dict(layers=layers) for layers in ('3,4', '2,3,4', 'all')]
    + [dict(layers='all', layer_weights=w) for w in ('increasing', 'decreasing', 'last_only')]
    + [dict(layers='3,4', layer_weights='0.5,1', layer_losses='cosine,l2')]
    + [dict(projector=p) for p in list_projectors() if p != 'identity']
    + [dict(projector='simkd', factor=f) for f in (1, 4, 8)]
    + [dict(projector='identity', teacher='resnet14')]          # equal widths: identity is allowed
    + [dict(method='kd', loss='crd+kl', loss_weight='0.8,1', layers='4', projector='none')]   # no projector: CRD embeds 64 and 256 channels
    + [dict(direction=d) for d in ('down', 'middle')]
    + [dict(direction='down', target_proj='frozen')]               # the teacher-side projector kept at its initialization
    + [dict(direction='middle', layers='all', projector='linear')]
)


def as_values(v) -> list:
    "A knob's value as a list of numbers or words: '1,0.5' and [1.0, 0.5] alike, 'l2+kl' and ['l2', 'kl'] alike."
    items = re.split(r'[,+]', v) if isinstance(v, str) else v if isinstance(v, list) else [v]
    def one(x):
        try: return float(x)
        except (TypeError, ValueError): return str(x).strip()
    return [one(x) for x in items]


def _id(axis): return '-'.join(f'{k}={v}' for k, v in axis.items())


@pytest.mark.parametrize('axis', AXES, ids=[_id(a) for a in AXES])
def test_axis_runs_end_to_end(axis, synthetic_cifar100, tmp_path_factory):
    runs = tmp_path_factory.getbasetemp() / 'runs-axes'   # shared: each teacher is trained once
    name = _id(axis).replace('=', '_').replace(',', '_').replace('+', '_')
    run_notebook(runs / f'{name}.ipynb', **quick_params(synthetic_cifar100, runs, **{**PAIR, **axis}, run_name=name))
    d = runs / name
    params = json.loads((d / 'config.json').read_text())['params']
    for k, v in axis.items():
        assert as_values(params[k]) == as_values([1, 2, 3, 4] if (k, v) == ('layers', 'all') else v), (k, v, params[k])
    s = json.loads((d / 'summary.json').read_text())
    assert s['status'] == 'done' and SUMMARY_KEYS <= set(s) and s['epochs'] == 1
    assert s['deploy_flops'] > 0 and s['projector_flops'] >= 0 and s['deploy_params'] > 0
    assert (d / 'metrics.csv').is_file() and (d / 'best.pt').is_file() and executed_notebook(d)


def test_adversarial_discriminator_is_trained(synthetic_cifar100, tmp_path):
    "The discriminator of the adversarial loss changes during training (its own optimizer steps inside the trainer)."
    import torch
    run_notebook(tmp_path / 'adv.ipynb', **quick_params(synthetic_cifar100, tmp_path, **PAIR, loss='adversarial', run_name='adv'))
    last = torch.load(tmp_path / 'adv' / 'last.pt', weights_only=False)
    disc = {k: v for k, v in last['distiller'].items() if k.startswith('feature_losses.')}
    assert disc and last['aux_optimizer'] is not None and last['aux_optimizer']['state']


@pytest.mark.parametrize('bad, message', [
    (dict(layers='3,5'), "layers: stage(s) [5] out of range"),
    (dict(layers='4,3'), 'increasing'),
    (dict(layer_weights='steep'), 'layer_weights'),
    (dict(layers='3,4', layer_losses='l2'), 'layer_losses'),
    (dict(projector='identity'), 'needs equal widths'),
    (dict(projector='none'), "projector: 'none' leaves stage 4 64 channels wide in the student and 256 in the teacher, and l2"),
    (dict(direction='sideways'), 'up, down, middle'),
    (dict(loss='l2+huber'), "loss: unknown 'huber'"),
    (dict(loss_options='{"smooth_l1": {"gamma": 1}}', loss='smooth_l1'), 'gamma'),
    (dict(factor=3), 'factor'),
    (dict(loss='fsp', teacher='resnet14'), 'fsp trains nothing that feeds the reused teacher head'),
])
def test_bad_research_knobs_fail_before_training(bad, message, synthetic_cifar100, tmp_path):
    import papermill as pm
    with pytest.raises(pm.PapermillExecutionError) as e:
        run_notebook(tmp_path / 'bad.ipynb', **quick_params(synthetic_cifar100, tmp_path, **{**PAIR, **bad}, run_name='bad'))
    assert message in str(e.value)
    assert not (tmp_path / 'bad').exists()
