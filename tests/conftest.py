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


def quick_params(data_dir, runs_dir, **overrides):
    "Knobs of a fast CPU run of run_experiment.ipynb on synthetic data."
    return {**dict(dataset='cifar100', data_dir=str(data_dir), download=False, teacher='resnet14', student='resnet8',
                   preset='quick', train_limit=0, test_limit=0, device='cpu', runs_dir=str(runs_dir), progress=False),
            **overrides}
