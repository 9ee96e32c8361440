import os
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / 'nbs' / 'run_experiment.ipynb'
REAL_DATA = ROOT.parent / 'shared' / 'data'


@pytest.fixture(scope='session')
def synthetic_cifar100(tmp_path_factory):
    from kd_nb.data import make_synthetic_cifar
    return make_synthetic_cifar(tmp_path_factory.mktemp('data'), 'cifar100', n_train=320, n_test=160, seed=0)


def wait_for(check, seconds=30.0, what='condition'):
    "Poll `check()` until it returns something truthy (a file written by a detached process, say); return it."
    import time
    deadline = time.time() + seconds
    while time.time() < deadline:
        result = check()
        if result: return result
        time.sleep(0.1)
    raise AssertionError(f'{what}: not reached within {seconds:.0f}s')


def executed_notebook(run_dir, seconds=30.0) -> dict:
    "The run's copy of its executed notebook, once papermill has finished it (end time written)."
    import json
    def finished():
        try: nb = json.loads((Path(run_dir) / 'notebook.ipynb').read_text())
        except (OSError, ValueError): return None
        return nb if nb['metadata'].get('papermill', {}).get('end_time') else None
    return wait_for(finished, seconds, f'{run_dir}/notebook.ipynb with papermill end time')


def quick_params(data_dir, runs_dir, **overrides):
    "Knobs of a fast CPU run of run_experiment.ipynb on synthetic data."
    return {**dict(dataset='cifar100', data_dir=str(data_dir), download=False, teacher='resnet14', student='resnet8',
                   preset='quick', epochs=2, lr_milestones='1', train_limit=0, test_limit=0, device='cpu',
                   runs_dir=str(runs_dir), progress=False),
            **overrides}
