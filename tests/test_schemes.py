"Learning schemes beyond a fixed teacher: Teacher-free KD, deep mutual learning, online SimKD, a finished run as teacher, and the ordering of runs that wait for their teacher run."
import json
from pathlib import Path
import pytest
import torch
import yaml
from kd_nb.experiment import SCHEME_KNOBS, resolve_config, run_experiment
from kd_nb.run_table import QUANT_KNOBS, axis_of, load_runs
from kd_nb.stats import study_stats, research_axes
from kd_nb.sweep import expand, launch_waves, load_sweep, run_slurm, run_sweep, teacher_runs, validate
from conftest import ROOT

QUIET = lambda *args: None


def quick(data_dir, runs_dir, **knobs):
    return dict(dataset='cifar100', data_dir=str(data_dir), download=False, teacher='resnet14', student='resnet8',
                preset='quick', epochs=1, lr_milestones='1', train_limit=0, test_limit=0, device='cpu',
                runs_dir=str(runs_dir), progress=False, **knobs)


def test_schemes_quick_sweep_validates_and_orders_its_chain(tmp_path):
    sweep = load_sweep(ROOT / 'sweeps' / 'schemes_quick.yaml')
    configs = expand(sweep)
    resolved = {r['run_name']: r for r in validate(sweep, configs, tmp_path)}
    assert len(resolved) == 20
    assert {r['method'] for r in resolved.values()} == {'scratch', 'kd', 'simkd', 'tf_reg', 'tf_self', 'dml'}
    assert resolved['tf_self-resnet8-s0']['teacher'] == 'resnet8' and resolved['tf_reg-resnet8-s0']['teacher'] == ''
    assert resolved['dml-resnet8-s1']['scheme'] == {'peers': 2}
    waiting = {n: r['waits_for'] for n, r in resolved.items() if r.get('waits_for')}
    assert waiting == teacher_runs(configs) and len(waiting) == 4
    waves = launch_waves(list(resolved), teacher_runs(configs))
    assert len(waves) == 2 and set(waves[1]) == set(waiting) and set(waiting.values()) <= set(waves[0])


def test_slurm_jobs_depend_on_their_teacher_runs_job(monkeypatch, tmp_path):
    "Without a cluster: a fake submitit executor records what each job is submitted with."
    import submitit
    calls = []
    class Job:
        def __init__(self, n): self.job_id = str(100 + n)
    class Executor:
        def __init__(self, folder, cluster): self.params = {}
        def update_parameters(self, **p): self.params = {**self.params, **p}
        def submit(self, fn, spec):
            calls.append((spec['name'], dict(self.params))); return Job(len(calls))
        def map_array(self, fn, specs): return [self.submit(fn, s) for s in specs]
    monkeypatch.setattr(submitit, 'AutoExecutor', Executor)
    specs = [{'name': n, 'record': str(tmp_path / f'{n}.json')} for n in ('ta', 'other', 'student', 'grandchild')]
    jobs, outcomes = run_slurm(specs, tmp_path, 'slurm', {'extra': {'nice': 10}}, wait=False, log=QUIET,
                               after={'student': 'ta', 'grandchild': 'student', 'other': 'elsewhere'})
    got = {n: p.get('slurm_additional_parameters', {}) for n, p in calls}
    ids = {n: j.job_id for n, j in zip([s['name'] for s in specs], jobs)}
    assert got['ta'] == got['other'] == {'nice': 10}
    assert got['student'] == {'nice': 10, 'dependency': f"afterok:{ids['ta']}"}
    assert got['grandchild'] == {'nice': 10, 'dependency': f"afterok:{ids['student']}"}
    assert outcomes == []


def test_scheme_knobs_sit_on_the_scheme_axis():
    assert all(axis_of((k,), 'simkd') == 'scheme' for k in SCHEME_KNOBS if k not in QUANT_KNOBS)
    assert [axis_of((k,), m) for k in QUANT_KNOBS for m in ('scratch', 'simkd')] == ['quantization'] * 2   # training precision: its own axis
    assert [axis_of((), m) for m in ('scratch', 'kd', 'simkd', 'tf_reg', 'tf_self', 'dml')] == ['method'] * 3 + ['scheme'] * 3


def test_classic_runs_keep_their_identity():
    "Runs recorded before the scheme knobs existed have no `scheme`; the classic methods resolve to None, so they resume and group as before."
    for m in ('scratch', 'kd', 'fitnet', 'simkd'): assert resolve_config(method=m, preset='quick')['scheme'] is None


@pytest.mark.slow
def test_scheme_runs_on_synthetic_data(synthetic_cifar100, tmp_path):
    q = quick(synthetic_cifar100, tmp_path / 'runs')
    s = run_experiment(log=QUIET, method='tf_reg', run_name='tf_reg', **q)
    assert s['status'] == 'done' and s['teacher_test_acc'] is None and s['deploy_params'] == s['student_params']
    s = run_experiment(log=QUIET, method='tf_self', run_name='tf_self', **q)
    assert s['teacher'] == 'resnet8' and '/teachers/cifar100-resnet8-' in s['teacher_source']
    s = run_experiment(log=QUIET, method='dml', run_name='dml', **q)
    assert s['best_test_acc'] == max(s['peer1_best_test_acc'], s['peer2_best_test_acc']) and s['deploy_params'] == s['student_params']
    m = (tmp_path / 'runs' / 'dml' / 'metrics.csv').read_text().splitlines()[0].split(',')
    assert {'peer1_test_acc1', 'peer2_test_acc1', 'train_kl_peer2', 'test_acc1'} <= set(m)
    s = run_experiment(log=QUIET, method='simkd', teacher_mode='online', run_name='online', **q)
    assert s['scheme'] == {'teacher_mode': 'online', 'online_warmup': 1} and 'teacher_best_test_acc' in s
    ta = run_experiment(log=QUIET, method='simkd', run_name='ta', **q)
    st = run_experiment(log=QUIET, method='simkd', teacher_run='ta', run_name='st', **q)
    best = tmp_path / 'runs' / 'ta' / 'best.pt'
    import hashlib
    link = {'run': str(best.parent), 'sha256': hashlib.sha256(best.read_bytes()).hexdigest()}
    assert st['scheme']['teacher_chain'] == [link] and st['teacher_sha256'] == link['sha256']
    assert st['teacher_test_acc'] == ta['best_test_acc']   # the teacher is the model the assistant deployed at its best epoch
    cfg = json.loads((tmp_path / 'runs' / 'st' / 'config.json').read_text())['params']
    assert cfg['teacher_chain'] == [link] and cfg['teacher'] == 'resnet8'
    s2 = run_experiment(log=QUIET, method='kd', teacher_run=str(tmp_path / 'runs' / 'st'), run_name='s2', **q)
    assert [l['run'] for l in s2['scheme']['teacher_chain']] == [str(tmp_path / 'runs' / 'st'), str(best.parent)]
    with pytest.raises(ValueError, match="teacher_run: .* holds no finished run"):
        resolve_config(**{**q, 'teacher_run': str(tmp_path / 'runs' / 'teachers')})
    stats = study_stats(load_runs(tmp_path / 'runs'))
    assert 'scheme' in research_axes(stats) and set(stats[stats.axis == 'scheme'].method) >= {'tf_reg', 'tf_self', 'dml', 'simkd'}


@pytest.mark.slow
def test_sweep_runs_a_student_after_its_teacher_run(synthetic_cifar100, tmp_path):
    path = tmp_path / 'chain.yaml'
    base = {k: v for k, v in quick(synthetic_cifar100, '').items() if k != 'runs_dir'}
    path.write_text(yaml.safe_dump({'name': 'chain', 'base': base, 'runs': [
        {'name': 'kd-chain', 'method': 'kd', 'teacher_run': 'simkd-resnet14-resnet8-s0'}, {'method': 'simkd'}]}))
    r = run_sweep(path, tmp_path / 'runs', workers=2, log=QUIET)
    assert r.launched == ['simkd-resnet14-resnet8-s0', 'kd-chain-s0']
    assert [o['status'] for o in r.outcomes] == ['done', 'done']
    student = json.loads((tmp_path / 'runs' / 'chain' / r.launched[1] / 'summary.json').read_text())
    assert student['scheme']['teacher_chain'][0]['run'].endswith('chain/simkd-resnet14-resnet8-s0')
    # a fresh clone: the assistant's summary is there, its best.pt is not; a new student of it stops the sweep, by name
    import hashlib, shutil
    from kd_nb.sweep import SweepError
    root = tmp_path / 'runs' / 'chain'
    (root / r.launched[0] / 'best.pt').unlink(); shutil.rmtree(root / r.launched[1])
    with pytest.raises(SweepError, match="simkd-resnet14-resnet8-s0 finished, but best.pt is not in their folders"):
        run_sweep(path, tmp_path / 'runs', log=QUIET)
    assert (root / r.launched[0] / 'summary.json').is_file() and not (root / r.launched[1]).exists()   # nothing moved or run
    r2 = run_sweep(path, tmp_path / 'runs', only='kd-chain', retrain_teachers=True, log=QUIET)
    assert r2.launched == r.launched and [o['status'] for o in r2.outcomes] == ['done', 'done']
    [old] = (root / '_set_aside').iterdir()
    assert old.name.startswith(r.launched[0] + '-') and json.loads((old / 'summary.json').read_text())['status'] == 'done'
    best = (root / r.launched[0] / 'best.pt').read_bytes()
    student = json.loads((root / r.launched[1] / 'summary.json').read_text())
    assert student['scheme']['teacher_chain'][0]['sha256'] == hashlib.sha256(best).hexdigest()
