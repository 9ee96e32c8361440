"Integration: sweeps of run_experiment.ipynb on CPU and synthetic data: local workers, no repeated work, retries, the slurm path."
import json, os, re, shutil, subprocess, sys, time
from pathlib import Path
from types import SimpleNamespace
import pytest
import yaml
from kd_nb.losses import list_losses
from kd_nb.sweep import SweepError, expand, load_sweep, run_sweep, sweep_status, validate
from kd_nb.cli import sweep_main as main
from kd_nb.hardware import available_cores
from kd_nb.experiment import resolve_config
from conftest import ROOT

TINY = dict(dataset='cifar100', teacher='resnet14', student='resnet8', preset='quick', epochs=1, train_limit=0,
            test_limit=0, device='cpu', progress=False)
QUIET = lambda *args: None
_SHARED = {}


def write_sweep(path, **content):
    Path(path).write_text(yaml.safe_dump(content, sort_keys=False))
    return Path(path)


def data_overrides(data_dir): return {'data_dir': str(data_dir), 'download': False}


def run_quick_sweep(data_dir, base_tmp):
    """The 12-run sweep shared by the sweep and report tests: the four methods and two SimKD variants, two seeds,
    run once per test session with two local workers (a second caller gets the first call's result)."""
    if 'quick' not in _SHARED:
        root = Path(base_tmp) / 'quick-sweep'
        root.mkdir(exist_ok=True)
        path = write_sweep(root / 'tiny.yaml', name='tiny', base=TINY, axes={'method': ['scratch', 'kd', 'fitnet', 'simkd']},
                           runs=[{'loss': 'cosine'}, {'layers': '3,4', 'layer_weights': 'increasing'}], seeds=[0, 1])
        t0 = time.time()
        result = run_sweep(path, root / 'runs', workers=2, overrides=data_overrides(data_dir), log=QUIET)
        _SHARED['quick'] = SimpleNamespace(path=path, runs=root / 'runs', dir=root / 'runs' / 'tiny', result=result,
                                           seconds=time.time() - t0, data=data_dir)
    return _SHARED['quick']


@pytest.fixture(scope='session')
def quick_sweep(synthetic_cifar100, tmp_path_factory):
    return run_quick_sweep(synthetic_cifar100, tmp_path_factory.getbasetemp())


def summaries(sweep_dir):
    return {p.parent.name: json.loads(p.read_text()) for p in Path(sweep_dir).glob('*/summary.json')}


@pytest.mark.slow
def test_quick_sweep_completes_with_two_workers(quick_sweep):
    r = quick_sweep.result
    assert len(r.planned) == 12 and sorted(r.launched) == sorted(r.planned) and r.failed == []
    assert [o['status'] for o in r.outcomes] == ['done'] * 12
    assert 'simkd-resnet14-resnet8-loss_cosine-s1' in r.planned and 'scratch-resnet8-s0' in r.planned
    assert 'simkd-resnet14-resnet8-layers_3+4-layer_weights_increasing-s0' in r.planned
    s = summaries(quick_sweep.dir)
    assert sorted(s) == sorted(r.planned) and {v['status'] for v in s.values()} == {'done'}
    assert s['simkd-resnet14-resnet8-loss_cosine-s1']['loss'] == ['cosine'] and s['kd-resnet14-resnet8-s1']['seed'] == 1
    for name in r.planned:
        d = quick_sweep.dir / name
        assert (d / 'notebook.ipynb').is_file() and (d / 'metrics.csv').is_file()
        assert (quick_sweep.dir / '_sweep' / f'{name}.log').is_file()
        config = json.loads((d / 'config.json').read_text())
        assert config['params']['teachers_dir'] == str(quick_sweep.runs / 'teachers')
        assert config['threads'] == max(1, available_cores() // 2)           # the cores split between the 2 workers
        assert (config['params']['step_mode'], config['params']['drop_last']) == ('eager', False)   # a CPU run: every image, no graphs
        assert s[name]['peak_memory_mb'] > 0                                  # the process's peak resident set
    teachers = sorted(p.name for p in (quick_sweep.runs / 'teachers').iterdir())   # one teacher per seed, shared
    assert len(teachers) == 2 and all(re.fullmatch(rf'cifar100-resnet14-e1-n0-s{s}-[0-9a-f]{{8}}', t) for s, t in enumerate(teachers)), teachers
    assert not (quick_sweep.dir / 'teachers').exists()
    print(f'12-run sweep with 2 workers: {quick_sweep.seconds:.0f}s')


@pytest.mark.slow
def test_rerun_does_no_work(quick_sweep):
    before = {p: p.stat().st_mtime_ns for p in quick_sweep.dir.glob('*/*') if p.is_file()}
    r = run_sweep(quick_sweep.path, quick_sweep.runs, workers=2, overrides=data_overrides(quick_sweep.data), log=QUIET)
    assert r.launched == [] and r.outcomes == [] and set(r.skipped.values()) == {'done'}
    assert {p: p.stat().st_mtime_ns for p in quick_sweep.dir.glob('*/*') if p.is_file()} == before


@pytest.mark.slow
def test_status_reports_every_run_done(quick_sweep):
    rows = sweep_status(quick_sweep.path, quick_sweep.runs)
    assert len(rows) == 12 and {r['status'] for r in rows} == {'done'}
    assert all(0 <= r['best_test_acc'] <= 100 and r['epochs_done'] == r['epochs'] == 1 and r['wall_time_s'] > 0 for r in rows)
    out = subprocess.run(['kd-sweep', 'status', str(quick_sweep.path), '--runs', str(quick_sweep.runs)],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith('12 runs: 12 done') and 'scratch-resnet8-s1' in out


@pytest.mark.slow
def test_interrupted_run_resumes_and_failed_run_is_retried_only_with_retry_failed(quick_sweep, tmp_path):
    runs = tmp_path / 'runs'
    shutil.copytree(quick_sweep.runs, runs)
    name, cut = 'simkd-resnet14-resnet8-s0', 'kd-resnet14-resnet8-s1'
    summary_path = runs / 'tiny' / name / 'summary.json'
    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps({**summary, 'status': 'failed', 'error': 'RuntimeError: node lost'}))
    # a run whose process died while it was running (its launch record names a process that is gone)
    gone = subprocess.Popen([sys.executable, '-c', 'pass']); gone.wait()
    cut_summary = runs / 'tiny' / cut / 'summary.json'
    cut_summary.write_text(json.dumps({**json.loads(cut_summary.read_text()), 'status': 'running'}))
    record = runs / 'tiny' / '_sweep' / f'{cut}.json'
    record.write_text(json.dumps({**json.loads(record.read_text()), 'pid': gone.pid, 'finished': None}))
    states = {row['run']: row['status'] for row in sweep_status(quick_sweep.path, runs)}
    assert states[name] == 'failed' and states[cut] == 'interrupted'
    args = dict(overrides=data_overrides(quick_sweep.data), log=QUIET)
    r = run_sweep(quick_sweep.path, runs, **args)
    assert r.launched == [cut] and r.skipped[name] == 'failed' and [o['status'] for o in r.outcomes] == ['done']
    assert json.loads(cut_summary.read_text())['status'] == 'done' and not (runs / 'tiny' / f'{cut}-2').exists()
    assert {row['run']: row['status'] for row in sweep_status(quick_sweep.path, runs)}[name] == 'failed'
    # retried (through submitit's debug executor): the run resumes in its own folder from its last checkpoint
    r = run_sweep(quick_sweep.path, runs, retry_failed=True, backend='slurm', cluster='debug', **args)
    assert r.launched == [name] and [o['status'] for o in r.outcomes] == ['done']
    after = json.loads(summary_path.read_text())
    assert after['status'] == 'done' and after['error'] is None and after['best_test_acc'] == summary['best_test_acc']
    assert not (runs / 'tiny' / f'{name}-2').exists()
    assert json.loads((runs / 'tiny' / '_sweep' / f'{name}.json').read_text())['cluster'] == 'debug'


@pytest.mark.slow
def test_slurm_backend_with_submitit_local_executor(synthetic_cifar100, tmp_path):
    path = write_sweep(tmp_path / 'alone.yaml', base={**TINY, 'method': 'scratch'}, seeds=[0, 1])
    runs = tmp_path / 'runs'
    r = run_sweep(path, runs, backend='slurm', cluster='local', slurm={'cpus': 1, 'time': 20},
                  overrides=data_overrides(synthetic_cifar100), log=QUIET)
    assert r.launched == ['scratch-resnet8-s0', 'scratch-resnet8-s1'] and len(r.jobs) == 2
    assert [o['status'] for o in r.outcomes] == ['done', 'done']
    assert {row['status'] for row in sweep_status(path, runs)} == {'done'}
    slurm_files = [p.name for p in (runs / 'alone' / '_slurm').rglob('*') if p.is_file()]
    assert any(n.endswith('_log.out') for n in slurm_files) and any(n.endswith('_result.pkl') for n in slurm_files)
    record = json.loads((runs / 'alone' / '_sweep' / 'scratch-resnet8-s1.json').read_text())
    assert record['backend'] == 'slurm' and record['cluster'] == 'local' and record['returncode'] == 0
    again = run_sweep(path, runs, backend='slurm', cluster='local', overrides=data_overrides(synthetic_cifar100), log=QUIET)
    assert again.launched == [] and again.jobs == []


@pytest.mark.parametrize('content, message', [
    (dict(base={**TINY, 'lossx': 'l1'}), "base: unknown knob 'lossx'"),
    (dict(base=TINY, axes={'loss': ['l1', 'l3']}), "run 'simkd-resnet14-resnet8-loss_l3-s0': loss: unknown 'l3'"),
    (dict(base=TINY, axes={'method': ['kd', 'crd']}), "method: unknown 'crd'"),
    (dict(base=TINY, runs=[{'layers': '3,5'}]), 'layers: stage(s) [5] out of range'),
    (dict(base={**TINY, 'teacher': 'resnet8x4'}, grids=[{'projector': ['linear', 'identity']}]), "projector 'identity' needs equal widths"),
    (dict(base={**TINY, 'progress': 'flase'}), "progress: expected a boolean (true/false, yes/no, on/off, 1/0), got 'flase'"),
    (dict(base={**TINY, 'epochs': 0}), 'epochs: must be an integer >= 1, got 0'),
])
def test_invalid_sweep_fails_before_launching(content, message, tmp_path, capsys):
    path = write_sweep(tmp_path / 'broken.yaml', **content)
    with pytest.raises(SweepError) as e:
        run_sweep(path, tmp_path / 'runs', log=QUIET)
    assert message in str(e.value) and 'broken.yaml' in str(e.value)
    assert not (tmp_path / 'runs').exists()
    assert main(['run', str(path), '--runs', str(tmp_path / 'runs')]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / 'runs').exists()


def test_dry_run_validates_and_launches_nothing(tmp_path, capsys):
    path = write_sweep(tmp_path / 'dry.yaml', base=TINY, axes={'loss': ['l1', 'cosine']}, seeds=[0, 1, 2])
    assert main(['run', str(path), '--runs', str(tmp_path / 'runs'), '--dry-run']) == 0
    assert 'dry: 6 runs (6 pending); would launch 6' in capsys.readouterr().out
    assert not (tmp_path / 'runs' / 'dry').exists() or not any((tmp_path / 'runs' / 'dry').iterdir())


EVERY_LOSS = 3 * len(list_losses())   # `loss: all`, three seeds
SHIPPED = {'baseline': 36, 'losses': EVERY_LOSS, 'layers': 39, 'projectors': 57, 'direction': 27,
           'baseline_quick': 24, 'losses_quick': EVERY_LOSS, 'layers_quick': 39, 'projectors_quick': 57, 'direction_quick': 27,
           'fast_path': 9, 'fast_path_quick': 9, 'cifar10_cpu': 32}


@pytest.mark.parametrize('name', sorted(SHIPPED))
def test_shipped_sweeps_expand_and_validate(name):
    sweep = load_sweep(ROOT / 'sweeps' / f'{name}.yaml')
    configs = expand(sweep)
    assert sweep.name == name and len(configs) == SHIPPED[name]
    resolved = validate(sweep, configs)
    assert len({c['run_name'] for c in configs}) == len(configs)
    if name == 'cifar10_cpu':   # the study on real pixels: every method with 3 seeds, every research axis with 2
        seeds = lambda **k: sorted(c['seed'] for c in resolved if all(c[a] == v for a, v in k.items()))
        for m in ('scratch', 'kd', 'fitnet'): assert seeds(method=m) == [0, 1, 2]
        assert seeds(method='simkd', loss=['l2'], layers=[4], projector='simkd', direction='up') == [0, 1, 2]
        assert {tuple(c['loss']) for c in resolved if c['method'] == 'simkd'} >= {('l2',), ('l1',), ('cosine',), ('cka',)}
        assert {tuple(c['layers']) for c in resolved if c['method'] == 'simkd'} == {(4,), (3, 4), (2, 3, 4)}
        assert {c['projector'] for c in resolved if c['method'] == 'simkd'} == {'simkd', 'linear', 'convreg'}
        assert {c['direction'] for c in resolved} == {'up', 'down', 'middle'}
        assert {(c['teacher_seed'], c['teacher_epochs'], c['teacher_train_limit']) for c in resolved} == {(0, 10, 20000)}
        return
    assert sweep.seeds == [0, 1, 2]
    quick = name.endswith('_quick')
    if name.startswith('fast_path'):  # the recipe on two execution paths, and at batch 256 with a scaled learning rate
        by_batch = sorted({(c['preset'], c['batch_size'], c['lr'], c['epochs'], c['train_limit']) for c in resolved})
        recipe = ('quick', 64, 0.05, 12, 5000) if quick else ('paper', 64, 0.05, 240, 0)
        assert by_batch == sorted([recipe, ('fast', 256, 0.2, *recipe[3:])])
        paths = {(c['fast_data'], c['amp'], c['channels_last'], c['fused_optimizer'], c['compile']) for c in resolved}
        assert paths == {(True, 'auto', True, True, 'auto'), (False, 'off', False, False, 'off')}
        return
    assert {c['preset'] for c in resolved} == {'quick' if quick else 'paper'}
    if name.startswith('losses'):
        assert sorted({l for c in resolved for l in c['loss']}) == sorted(list_losses())
    if name.startswith('projectors'):
        assert {(c['projector'], c['factor']) for c in resolved if c['projector'] == 'simkd'} == {('simkd', f) for f in (1, 2, 4, 8)}
        assert {c['projector'] for c in resolved} == {'identity', 'linear', 'simkd', 'mlp', 'dwsep', 'conv3x3', 'convreg'}
    if name.startswith('direction'):
        assert {c['direction'] for c in resolved} == {'up', 'down', 'middle'}
    if name.startswith('layers'):
        assert {tuple(c['layers']) for c in resolved} == {(4,), (3, 4), (2, 3, 4), (1, 2, 3, 4)}
        assert {c['layer_weights'] for c in resolved} == {'uniform', 'increasing', 'decreasing', 'last_only'}
    if name.startswith('baseline'):
        assert {c['method'] for c in resolved} == {'scratch', 'kd', 'fitnet', 'simkd'}


def shipped(name: str) -> tuple:
    "The sweep file `sweeps/<name>.yaml` and its configurations, validated."
    sweep = load_sweep(ROOT / 'sweeps' / f'{name}.yaml')
    return sweep, validate(sweep, expand(sweep))


def test_converged_study_sweeps():
    "The converged study: one committed teacher, the budget curve (16 epochs after the 8 it chose), and the study at its budget B = 8 epochs."
    (teacher, [t]), (budget, curve), (study, runs) = (shipped(f) for f in ('cifar10_teacher', 'cifar10_budget', 'cifar10_converged'))
    assert (teacher.name, budget.name, study.name, len(curve), len(runs)) == ('teacher', 'budget', 'converged', 44, 64)
    ckpt = 'results/cifar10-jpeg-converged/teacher/scratch-resnet20-s0/best.pt'
    assert (t['method'], t['student'], t['train_limit']) == ('scratch', 'resnet20', 0) and (ROOT / ckpt).is_file()
    assert {c['epochs'] * 50_000 for c in curve} == {50_000, 100_000, 200_000, 400_000, 800_000} and {c['epochs'] for c in runs} == {8}
    at_16 = {(c['method'], '+'.join(c['loss']), tuple(c['loss_weight']), c['seed']) for c in curve if c['epochs'] == 16}
    assert {(m, l, w) for m, l, w, _ in at_16} >= {('simkd', 'l2', (1.0,)), ('simkd', 'l2', (50.0,)), ('simkd', 'smooth_l1', (50.0,))}   # L2 at its default weight 1 and at 50 (the shape/scale sweep's best)
    assert len(at_16) == 12 and {s for *_, s in at_16} == {0, 1}
    for c in curve + runs:   # every run distills from the committed teacher, or from a run, or from a copy of itself
        assert (c['train_limit'], c['test_limit'], c['lr_milestones']) == (0, 0, [0.625, 0.75, 0.875])
        assert c['teacher_ckpt'] == ckpt or c['teacher_run'] or c['method'] in ('scratch', 'tf_reg', 'tf_self', 'dml')
    at_b = [c for c in curve if c['epochs'] == 8] + runs
    def plain(c):   # the method's own defaults: no knob but method and seed changed from the study's base
        ref = resolve_config(**{**study.base, 'method': c['method'], 'seed': c['seed']})
        return all(c[k] == v for k, v in ref.items() if k not in ('run_name', 'teacher', 'teacher_ckpt'))
    for m in ('scratch', 'kd', 'fitnet', 'simkd'): assert sorted(c['seed'] for c in at_b if c['method'] == m and plain(c)) == [0, 1, 2], m
    simkd = [c for c in at_b if c['method'] == 'simkd' and c['student'] == 'resnet8' and not c['teacher_run']]
    for loss in ('l1', 'smooth_l1'):   # the losses that beat L2 with 2 seeds get a third
        assert sorted(c['seed'] for c in at_b if c['method'] == 'simkd' and c['loss'] == [loss] and c['layers'] == [4]) == [0, 1, 2], loss
    assert {'+'.join(c['loss']) for c in simkd} == {'l2', 'l1', 'smooth_l1', 'cosine', 'kl', 'rkd', 'emd', 'pkt', 'vid', 'cc',
                                                   'dkd', 'crd', 'l2+fsp'}
    assert {(tuple(c['layers']), c['layer_weights']) for c in simkd} >= {((3, 4), 'uniform'), ((2, 3, 4), 'uniform'), ((2, 3, 4), 'increasing')}
    assert {(c['projector'], c['factor']) for c in simkd} >= {('simkd', 1), ('simkd', 4), ('linear', 2), ('convreg', 2)}
    assert {c['direction'] for c in simkd} == {'up', 'down', 'middle'} and {c['teacher_mode'] for c in simkd} == {'frozen', 'online'}
    schemes = sorted((c['method'], c['student'], bool(c['teacher_run']), c['seed']) for c in runs if c['method'] in ('tf_reg', 'tf_self', 'dml')
                     or c['teacher_run'] or c['student'] == 'resnet14')
    assert schemes == sorted([(m, 'resnet8', False, s) for m in ('tf_reg', 'tf_self', 'dml') for s in (0, 1)] +
                             [(m, st, chained, s) for m in ('kd', 'simkd') for st, chained in (('resnet14', False), ('resnet8', True)) for s in (0, 1)])


@pytest.mark.parametrize('failure', ['raises', 'UNKNOWN'])
def test_failed_slurm_query_is_unknown_never_running(failure, tmp_path, monkeypatch):
    "A job whose SLURM status cannot be read is reported as unknown with the error, and neither counted as running nor relaunched."
    import submitit
    from kd_nb.sweep import run_state, counts
    class Unreachable(submitit.SlurmJob):
        @property
        def state(self):
            if failure == 'raises': raise OSError('slurm_load_jobs error: Socket timed out')
            return 'UNKNOWN'
    monkeypatch.setattr(submitit, 'SlurmJob', Unreachable)
    folder = tmp_path / 'run'; folder.mkdir()
    (folder / 'summary.json').write_text(json.dumps({'status': 'running'}))
    state = run_state(folder, {'cluster': 'slurm', 'folder': str(tmp_path), 'job_id': '42'})
    assert state['status'] == 'unknown' and 'job 42' in state['error']
    assert ('Socket timed out' if failure == 'raises' else 'returned UNKNOWN') in state['error']
    assert counts([state['status']]) == '1 unknown'
    (folder / 'summary.json').write_text(json.dumps({'status': 'done'}))
    assert run_state(folder, {'cluster': 'slurm', 'folder': str(tmp_path), 'job_id': '42'})['status'] == 'done'


def test_published_and_second_pair_sweeps():
    "The published methods on the first pair (3 seeds, its teacher and budget) and the second pair (2 seeds, a third for KD, SimKD, SimKD with L2 at weights 25 and 50 and with smooth L1 and cosine, CRD with KD, and down at weight 1; L2 at weights 1, 25 and 50, the directions down and middle at 1 and 50, and with their teacher-side projector frozen (down at 1 and 50, middle at 50); 256 channels into 64, its own teacher)."
    (_, published), (_, pair2) = shipped('cifar10_published'), shipped('cifar10_pair2')
    assert (len(published), len(pair2)) == (12, 52)
    method = lambda c: ('+'.join(c['loss']), c['ce_weight'], tuple(c['loss_weight']), c['loss_options'].get('kl', {}).get('standardize', False))
    seeds = lambda runs: {m: sorted(c['seed'] for c in runs if method(c) == m) for m in {method(c) for c in runs}}
    assert seeds(published) == {('dkd', 1.0, (1.0,), False): [0, 1, 2], ('kl', 0.1, (9.0,), True): [0, 1, 2],
                                ('crd', 1.0, (0.8,), False): [0, 1, 2], ('crd+kl', 1.0, (0.8, 1.0), False): [0, 1, 2]}
    assert {(c['method'], c['teacher'], c['student'], c['epochs'], c['teacher_ckpt']) for c in published} == \
        {('kd', 'resnet20', 'resnet8', 8, 'results/cifar10-jpeg-converged/teacher/scratch-resnet20-s0/best.pt')}
    ckpt = 'results/cifar10-jpeg-pair2/teacher/scratch-resnet8x4-s0/best.pt'
    assert {(c['teacher'], c['student'], c['epochs'], c['teacher_ckpt']) for c in pair2} == {('resnet8x4', 'resnet8', 8, ckpt)}
    assert (ROOT / ckpt).is_file() and {c['seed'] for c in pair2} == {0, 1, 2}
    assert sorted((c['method'], tuple(c['loss']), tuple(c['loss_weight']), c['direction']) for c in pair2 if c['seed'] == 2) == \
        [('kd', ('crd', 'kl'), (0.8, 1.0), 'up'), ('kd', ('kl',), (0.9,), 'up'), ('simkd', ('cosine',), (50.0,), 'up'),
         ('simkd', ('l2',), (1.0,), 'down'), ('simkd', ('l2',), (1.0,), 'up'), ('simkd', ('l2',), (25.0,), 'up'),
         ('simkd', ('l2',), (50.0,), 'up'), ('simkd', ('smooth_l1',), (50.0,), 'up')]
    directions = {(c['direction'], c['loss_weight'][0]) for c in pair2 if c['method'] == 'simkd' and c['loss'] == ['l2']}
    assert {d for d, _ in directions} == {'up', 'down', 'middle'} and {('down', 50.0), ('middle', 50.0)} <= directions   # and at the weight up pays at
    assert {w for _, w in directions} == {1.0, 25.0, 50.0}   # 25: smooth L1's control
    frozen = sorted((c['direction'], c['loss_weight'][0], c['seed']) for c in pair2 if c.get('target_proj') == 'frozen')
    assert frozen == [(d, w, s) for d, w in [('down', 1.0), ('down', 50.0), ('middle', 50.0)] for s in (0, 1)]   # the control for a collapsing target
    assert {(c['projector'], c['factor']) for c in pair2 if c['method'] == 'simkd'} == {('simkd', 1), ('simkd', 2), ('simkd', 4), ('linear', 2)}
    assert {c['projector'] for c in pair2 if 'crd' in c['loss']} == {'none'}   # each network embedded from its own width
    assert set(seeds([c for c in pair2 if c['method'] == 'kd'])) == set(seeds(published)) | {('kl', 0.1, (0.9,), False)}   # and plain KD
