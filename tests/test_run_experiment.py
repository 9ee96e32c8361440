"Integration: papermill runs of nbs/run_experiment.ipynb on synthetic CIFAR-format data, on CPU."
import hashlib, json, os, signal, subprocess, sys, time
from pathlib import Path
import pandas as pd
import papermill as pm
import pytest
from conftest import NOTEBOOK, ROOT, quick_params, executed_notebook, wait_for

pytestmark = pytest.mark.slow   # papermill or torchrun runs: `pytest -m 'not slow'` leaves them out

SUMMARY_KEYS = {'best_test_acc', 'final_test_acc', 'teacher_test_acc', 'student_params', 'projector_params',
                'deploy_params', 'deploy_flops', 'epochs', 'wall_time_s', 'images_per_s', 'status'}


def run_notebook(out, **params):
    "Run the notebook through papermill's Python API (the output path is passed as papermill's CLI would inject it)."
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return pm.execute_notebook(str(NOTEBOOK), str(out), parameters={**params, 'PAPERMILL_OUTPUT_PATH': str(out)},
                               cwd=str(ROOT), progress_bar=False)


def cli_args(out, **params):
    "The papermill command line of one run."
    return [sys.executable, '-m', 'papermill', str(NOTEBOOK), str(out), '--cwd', str(ROOT), '--no-progress-bar'] + \
        sum((['-p', k, str(v)] for k, v in params.items()), [])


def only_run(runs_dir, name):
    return Path(runs_dir) / name


@pytest.mark.parametrize('method', ['scratch', 'kd', 'fitnet', 'simkd'])
def test_quick_run_writes_all_artifacts(method, synthetic_cifar100, tmp_path_factory):
    runs = tmp_path_factory.getbasetemp() / 'runs-methods'   # shared: the teacher is trained once, then reused
    run_notebook(runs / f'{method}.ipynb', **quick_params(synthetic_cifar100, runs, method=method, run_name=method))
    d = runs / method
    cfg = json.loads((d / 'config.json').read_text())
    assert cfg['params']['method'] == method and cfg['torch'] and cfg['device'] == 'cpu'
    summary = json.loads((d / 'summary.json').read_text())
    assert SUMMARY_KEYS <= set(summary) and summary['status'] == 'done' and summary['epochs'] == 2
    assert 0 <= summary['best_test_acc'] <= 100
    assert (summary['teacher_test_acc'] is None) == (method == 'scratch')
    assert (summary['projector_params'] > 0) == (method in ('fitnet', 'simkd'))
    m = pd.read_csv(d / 'metrics.csv')
    assert list(m.epoch) == [1, 2] and {'lr', 'train_loss', 'test_acc1', 'test_acc5', 'epoch_time_s'} <= set(m.columns)
    assert (d / 'best.pt').is_file() and (d / 'last.pt').is_file() and list(d.glob('events.out.tfevents.*'))
    assert executed_notebook(d)['cells'][-1]['outputs']          # the finished notebook, copied in when papermill is done
    if method != 'scratch':
        teacher_ckpt, = (runs / 'teachers').glob('*/best.pt')
        assert summary['teacher_source'] == str(teacher_ckpt.resolve())   # outside the project: absolute
        assert summary['teacher_sha256'] == hashlib.sha256(teacher_ckpt.read_bytes()).hexdigest()


def test_simkd_deploys_student_projector_and_teacher_head(synthetic_cifar100, tmp_path):
    "The deployed model is the student without its head, the projector, and the teacher's head (a wider one than the student's)."
    run_notebook(tmp_path / 'o.ipynb', **quick_params(synthetic_cifar100, tmp_path, run_name='s', epochs=1, teacher='resnet8x4'))
    s = json.loads((tmp_path / 's' / 'summary.json').read_text())
    student_head, teacher_head = 64 * 100 + 100, 256 * 100 + 100   # resnet8: 64 -> 100; resnet8x4: 256 -> 100
    assert s['deploy_params'] == s['student_params'] - student_head + s['projector_params'] + teacher_head
    assert s['projector_params'] > 0 and s['deploy_params'] != s['student_params'] + s['projector_params']


def test_finished_run_is_never_overwritten(synthetic_cifar100, tmp_path):
    p = quick_params(synthetic_cifar100, tmp_path, method='scratch', run_name='r', epochs=1)
    run_notebook(tmp_path / 'a.ipynb', **p)
    first = (tmp_path / 'r' / 'metrics.csv').read_bytes()
    run_notebook(tmp_path / 'b.ipynb', **p)
    assert (tmp_path / 'r' / 'metrics.csv').read_bytes() == first
    assert json.loads((tmp_path / 'r-2' / 'summary.json').read_text())['status'] == 'done'


@pytest.mark.parametrize('bad, message', [
    (dict(loss='l3'), "loss: unknown 'l3'"),
    (dict(student='resnet9'), 'resnet8x4'),
    (dict(epochs=-2), 'epochs'),
    (dict(epochs=0), 'epochs: must be an integer >= 1, got 0'),
    (dict(fast_data='flase'), "fast_data: expected a boolean"),
    (dict(projector='identity', teacher='resnet8x4'), 'needs equal widths'),
    (dict(data_dir='/nonexistent/cifar'), '/nonexistent/cifar'),
])
def test_invalid_parameters_fail_before_training(bad, message, synthetic_cifar100, tmp_path):
    with pytest.raises(pm.PapermillExecutionError) as e:
        run_notebook(tmp_path / 'bad.ipynb', **{**quick_params(synthetic_cifar100, tmp_path, run_name='bad'), **bad})
    assert message in str(e.value)
    assert not (tmp_path / 'bad').exists()      # nothing trained, no run folder


def test_checkpoint_of_other_architecture_fails_before_training(synthetic_cifar100, tmp_path):
    import torch
    from kd_nb.models import get_model, save_checkpoint
    save_checkpoint(get_model('resnet8'), tmp_path / 'wrong.pt')
    with pytest.raises(pm.PapermillExecutionError) as e:
        run_notebook(tmp_path / 'bad.ipynb', **quick_params(synthetic_cifar100, tmp_path, run_name='bad',
                                                            teacher_ckpt=str(tmp_path / 'wrong.pt')))
    assert 'wrong.pt' in str(e.value) and 'teacher_ckpt: ' in str(e.value) and 'does not fit resnet14' in str(e.value)
    assert not (tmp_path / 'bad').exists()


def test_failed_run_records_status_and_error(synthetic_cifar100, tmp_path):
    # a teachers_dir that is a file is only discovered once the run has started (preparing its teacher)
    (tmp_path / 'not-a-folder').write_text('')
    p = quick_params(synthetic_cifar100, tmp_path, run_name='f', epochs=1, teachers_dir=str(tmp_path / 'not-a-folder'))
    with pytest.raises(pm.PapermillExecutionError):
        run_notebook(tmp_path / 'f.ipynb', **p)
    s = json.loads((tmp_path / 'f' / 'summary.json').read_text())
    assert s['status'] == 'failed' and 'not-a-folder' in s['error'] and s['traceback']


def test_same_run_name_twice_at_once(synthetic_cifar100, tmp_path):
    "A second run of the same name and knobs while the first lives is refused, naming the live process; other knobs get NAME-2."
    p = quick_params(synthetic_cifar100, tmp_path, method='scratch', epochs=12, run_name='twin')   # alive while the twin starts
    first = subprocess.Popen(cli_args(tmp_path / 'a.ipynb', **p), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = tmp_path / 'twin' / 'summary.json'
    wait_for(lambda: summary.exists() and json.loads(summary.read_text()).get('status') == 'running', 120, 'first run started')
    with pytest.raises(pm.PapermillExecutionError) as e:
        run_notebook(tmp_path / 'b.ipynb', **p)
    assert "RunInUse: run_name: 'twin' is being run by process" in str(e.value)   # the first run's kernel, named
    run_notebook(tmp_path / 'c.ipynb', **{**p, 'seed': 1, 'epochs': 1})      # other knobs: a folder of its own
    assert first.wait(timeout=300) == 0
    assert json.loads(summary.read_text())['status'] == 'done' and len(pd.read_csv(tmp_path / 'twin' / 'metrics.csv')) == 12
    assert json.loads((tmp_path / 'twin-2' / 'summary.json').read_text())['seed'] == 1
    assert not (tmp_path / 'twin-3').exists()


def test_resume_after_kill_matches_uninterrupted_run(synthetic_cifar100, tmp_path):
    p = quick_params(synthetic_cifar100, tmp_path, method='simkd', epochs=4, lr_milestones='3')
    run_notebook(tmp_path / 'full.ipynb', **p, run_name='full')
    args = cli_args(tmp_path / 'cut.ipynb', **p, run_name='cut')
    proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / 'cut' / 'metrics.csv'
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(pd.read_csv(metrics)) >= 2):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    done = len(pd.read_csv(metrics))
    assert 2 <= done < 4, f'the run was not cut mid-way ({done} epochs)'
    assert json.loads((tmp_path / 'cut' / 'summary.json').read_text())['status'] == 'running'
    subprocess.run(cli_args(tmp_path / 'cut2.ipynb', **p, run_name='cut'), check=True, capture_output=True)
    keys = ['epoch', 'lr', 'train_loss', 'train_acc1', 'test_acc1', 'test_acc5', 'test_loss']
    full, cut = pd.read_csv(tmp_path / 'full' / 'metrics.csv'), pd.read_csv(metrics)
    pd.testing.assert_frame_equal(cut[keys], full[keys])
    s = json.loads((tmp_path / 'cut' / 'summary.json').read_text())
    assert s['status'] == 'done' and len(s['launches']) == 2               # killed once, finished by the second launch
    assert s['wall_time_s'] == pytest.approx(sum(l['seconds'] for l in s['launches'])) and s['launches'][0]['seconds'] > 0
    executed = executed_notebook(tmp_path / 'cut')                          # found from papermill's command line
    assert 'learning curves' in ''.join(''.join(c['source']) for c in executed['cells'])
    assert executed['cells'][-1]['outputs'], 'the copy holds the executed last cell'
    meta = executed['metadata']
    assert meta['papermill']['duration'] > 0 and meta['language_info']['name'] == 'python'


def test_quick_preset_learns_on_default_synthetic_data(tmp_path):
    "A smoke run shows learning: on `kd-data synthetic`'s defaults the quick preset takes teacher and student far above chance (1%)."
    from kd_nb.data import make_synthetic_cifar
    from kd_nb.experiment import run_experiment
    data = make_synthetic_cifar(tmp_path / 'data', 'cifar100')
    s = run_experiment(log=lambda *a: None, data_dir=str(data), download=False, teacher='resnet20', student='resnet8',
                       preset='quick', device='cpu', runs_dir=str(tmp_path / 'runs'), run_name='smoke', progress=False)
    assert s['teacher_test_acc'] > 30 and s['best_test_acc'] > 20, s
