from unittest import mock

import pytest
import torch
from torch import nn

from kd_nb.data import dataset_info, load_cifar, make_loaders, make_synthetic_cifar


def small_cnn(num_classes):
    return nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))


@torch.no_grad()
def accuracy(model, loader):
    model.eval()
    correct = sum((model(x).argmax(1) == y).sum().item() for x, y in loader)
    return correct / loader.num_samples


@pytest.fixture
def one_thread():
    "A tiny model trains fastest on one thread, and stays fast when other processes share the CPU"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_synthetic_cifar10_is_learnable(tmp_path, one_thread):
    torch.manual_seed(0)
    root = make_synthetic_cifar(tmp_path, 'cifar10', n_train=2000, n_test=500, seed=0)
    loaders = make_loaders('cifar10', root, batch_size=64, fast=True, seed=0, download=False)
    model = small_cnn(10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    before = accuracy(model, loaders.test)
    steps, epoch = 0, 0
    while steps < 300:
        loaders.train.set_epoch(epoch)
        model.train()
        for x, y in loaders.train:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
            steps += 1
        epoch += 1
    after = accuracy(model, loaders.test)
    assert after > 0.6, (before, after)  # chance is 0.1
    assert after > before + 0.3


def test_failed_download_names_dir_files_and_url(tmp_path):
    info = dataset_info('cifar100')
    offline = mock.patch('torchvision.datasets.cifar.download_and_extract_archive', side_effect=OSError('no network'))
    with offline, pytest.raises(RuntimeError) as err:
        load_cifar('cifar100', tmp_path, train=True, download=True)
    for s in (str(tmp_path), info.url, *info.files, 'no network'): assert s in str(err.value)


def test_replayed_epoch_gives_identical_batches(tmp_path):
    root = make_synthetic_cifar(tmp_path, 'cifar100', n_train=300, n_test=50, seed=1)
    for fast in (True, False):
        train = make_loaders('cifar100', root, batch_size=50, fast=fast, seed=3, num_workers=0, download=False).train
        runs = []
        for epoch in (4, 4, 5):
            train.set_epoch(epoch)
            runs.append(list(train))
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(runs[0], runs[1]))
        assert not torch.equal(runs[0][0][1], runs[2][0][1])
