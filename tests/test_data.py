import hashlib
import pickle
import shutil
import tarfile
import time
import urllib.error
import zipfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from conftest import REAL_DATA
from kd_nb.data import (CIFAR10_CLASSES, CIFAR100_CLASSES, CIFAR100_SUPERCLASSES, MANIFEST, cifar100_coarse_labels,
                        data_manifest, data_source, dataset_info, import_cifar, load_cifar, make_loaders,
                        make_synthetic_cifar, no_data_message, DeviceLoader, normalize_uint8)


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


# ---- copies kept as image files ----


def image_folder(root, classes, per_split=(('train', 2), ('test', 1)), fmt='PNG', seed=0):
    "Random images in root/<split>/<class>/NNNN.png; {relative path: (pixels, label)}"
    rng, known = np.random.default_rng(seed), {}
    for split, n in per_split:
        for k, c in enumerate(classes):
            (Path(root) / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rel, pixels = f'{split}/{c}/{i:04d}.{fmt.lower()}', rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(Path(root) / rel, fmt)
                known[rel] = (pixels, k)
    return known


def snapshot(root):
    "Every path under `root` with the bytes of each file; None if `root` does not exist"
    root = Path(root)
    if not root.exists(): return None
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in root.rglob('*')}


def test_import_cifar100_gives_the_known_pixels_under_the_official_labels(tmp_path):
    src = tmp_path / 'c100'
    known = image_folder(src, CIFAR100_CLASSES[::-1], per_split=(('train', 1), ('test', 1)))  # folders made in reverse
    known = {rel: (px, CIFAR100_CLASSES.index(rel.split('/')[1])) for rel, (px, _) in known.items()}
    report = import_cifar(src, 'cifar100', tmp_path / 'data', progress=False)
    assert (report.lossy, sum(report.counts['train'].values()), sum(report.counts['test'].values())) == (False, 100, 100)
    for split, train in (('train', True), ('test', False)):
        ds = load_cifar('cifar100', tmp_path / 'data', train=train, download=False)
        assert ds.classes == list(CIFAR100_CLASSES)
        expected = {px.tobytes(): k for rel, (px, k) in known.items() if rel.startswith(split)}
        assert {img.tobytes(): y for img, y in zip(ds.data, ds.targets)} == expected
        raw = pickle.load(open(tmp_path / 'data' / 'cifar-100-python' / split, 'rb'), encoding='latin1')
        assert raw['coarse_labels'] == cifar100_coarse_labels()[raw['fine_labels']].tolist()
        for name, row, y in zip(raw['filenames'], raw['data'], raw['fine_labels']):
            assert known[name][1] == y and np.array_equal(row, known[name][0].transpose(2, 0, 1).ravel())
    meta = pickle.load(open(tmp_path / 'data' / 'cifar-100-python' / 'meta', 'rb'), encoding='latin1')
    assert meta == {'fine_label_names': list(CIFAR100_CLASSES), 'coarse_label_names': list(CIFAR100_SUPERCLASSES)}
    assert data_source('cifar100', tmp_path / 'data') == 'imported: c100 (lossless)'


def _unknown_class(src):
    (src / 'train' / 'cat').rename(src / 'train' / 'cats')
    return ValueError, ["unknown class folder 'train/cats' (did you mean 'cat'?)", 'valid cifar10 classes: airplane, automobile']

def _missing_class(src):
    shutil.rmtree(src / 'test' / 'frog')
    return ValueError, ['test/ has no images of class(es) frog;', 'one folder per class: airplane, automobile']

def _wrong_size(src):
    Image.fromarray(np.zeros((31, 32, 3), np.uint8)).save(src / 'train' / 'dog' / 'small.png')
    return ValueError, [f'{src}: train/dog/small.png: 32x31 pixels; images must be 32x32']

def _undecodable(src):
    (src / 'test' / 'ship' / '0000.png').write_bytes(b'\x89PNG truncated')
    return ValueError, [f'{src}: test/ship/0000.png: does not decode as an image', 'valid formats: PNG, JPEG']

def _not_an_image(src):
    (src / 'train' / 'deer' / 'notes.txt').write_text('a note')
    return ValueError, ['train/deer/notes.txt: does not decode as an image']

def _empty_split(src):
    shutil.rmtree(src / 'test')
    return ValueError, ['the test split is empty: no images in test/<class>/', 'airplane, automobile, bird']

def _unknown_split(src):
    shutil.copytree(src / 'test', src / 'valid')
    return ValueError, ["unexpected folder 'valid'; valid: train/ and test/"]

def _no_source(src):
    shutil.rmtree(src)
    return FileNotFoundError, [f"src: '{src}' does not exist"]


@pytest.mark.parametrize('damage', [_unknown_class, _missing_class, _wrong_size, _undecodable, _not_an_image,
                                    _empty_split, _unknown_split, _no_source])
def test_bad_source_names_the_problem_and_leaves_data_dir_unchanged(tmp_path, damage):
    src = tmp_path / 'src'
    image_folder(src, CIFAR10_CLASSES, per_split=(('train', 1), ('test', 1)))
    error, expected = damage(src)
    held = make_synthetic_cifar(tmp_path / 'held', 'cifar10', n_train=20, n_test=10)  # would be replaced (force)
    before = snapshot(held)
    with pytest.raises(error) as err:
        import_cifar(src, 'cifar10', held, force=True, progress=False)
    for s in expected: assert s in str(err.value), (s, str(err.value))
    assert snapshot(held) == before
    with pytest.raises(error):
        import_cifar(src, 'cifar10', tmp_path / 'new' / 'data', progress=False)
    assert not (tmp_path / 'new').exists()


def test_unreadable_archive_and_unknown_source_type(tmp_path):
    (tmp_path / 'broken.tar.gz').write_bytes(b'\x1f\x8b\x08 not gzip')
    with pytest.raises(ValueError, match=r"src: cannot read '.*broken.tar.gz' as a tar.gz"):
        import_cifar(tmp_path / 'broken.tar.gz', 'cifar10', tmp_path / 'data', progress=False)
    (tmp_path / 'images.rar').write_bytes(b'x')
    with pytest.raises(ValueError, match=r'neither a folder nor an archive; valid: a folder, or a .tar.gz, .tgz, .tar, .zip'):
        import_cifar(tmp_path / 'images.rar', 'cifar10', tmp_path / 'data', progress=False)
    assert not (tmp_path / 'data').exists()


def test_folder_and_every_archive_type_import_to_identical_files(tmp_path):
    src = tmp_path / 'imgs'
    image_folder(src, CIFAR10_CLASSES, fmt='JPEG')
    (src / 'README.md').write_text('beside the splits: ignored')
    with tarfile.open(tmp_path / 'a.tar', 'w') as t: t.add(src, arcname='.')  # members named ./train/...
    with tarfile.open(tmp_path / 'b.tgz', 'w:gz') as t: t.add(src, arcname='CIFAR-10-images')
    with zipfile.ZipFile(tmp_path / 'c.zip', 'w') as z:
        for p in sorted(src.rglob('*')): z.write(p, p.relative_to(src).as_posix())
    reports = [import_cifar(s, 'cifar10', tmp_path / f'out{i}', progress=False)
               for i, s in enumerate((src, tmp_path / 'a.tar', tmp_path / 'b.tgz', tmp_path / 'c.zip'))]
    assert all(r.lossy for r in reports)
    assert [data_source('cifar10', tmp_path / f'out{i}') for i in range(4)] == [
        'imported: imgs (lossy)', 'imported: a.tar (lossy)', 'imported: b.tgz (lossy)', 'imported: c.zip (lossy)']
    files = dataset_info('cifar10').files
    first = {f: (reports[0].folder / f).read_bytes() for f in files}
    for r in reports[1:]:
        assert {f: (r.folder / f).read_bytes() for f in files} == first
    assert data_manifest('cifar10', tmp_path / 'out0')['image_formats'] == {'JPEG': 30}


def test_existing_copies_are_replaced_only_with_force(tmp_path):
    src, other = tmp_path / 'src', tmp_path / 'other'
    image_folder(src, CIFAR10_CLASSES, seed=0)
    image_folder(other, CIFAR10_CLASSES, seed=1)
    official = make_synthetic_cifar(tmp_path / 'official', 'cifar10', n_train=20, n_test=10)
    (official / 'cifar-10-batches-py' / MANIFEST).unlink()  # files without a manifest: taken for official files
    synthetic = make_synthetic_cifar(tmp_path / 'synthetic', 'cifar10', n_train=20, n_test=10, seed=4)
    imported = tmp_path / 'imported'
    import_cifar(other, 'cifar10', imported, progress=False)
    for data_dir, held in ((official, 'the official files'), (synthetic, 'a synthetic copy (seed 4'),
                           (imported, 'a copy imported from other (sha256')):
        before = snapshot(data_dir)
        with pytest.raises(FileExistsError) as err:
            import_cifar(src, 'cifar10', data_dir, progress=False)
        assert held in str(err.value) and 'force=True' in str(err.value) and str(data_dir) in str(err.value)
        assert snapshot(data_dir) == before
        report = import_cifar(src, 'cifar10', data_dir, force=True, progress=False)
        assert not report.already_imported and data_source('cifar10', data_dir) == 'imported: src (lossless)'
        assert sorted(p.name for p in data_dir.iterdir()) == ['cifar-10-batches-py']  # nothing else left behind
    before = snapshot(imported)
    again = import_cifar(src, 'cifar10', imported, progress=False)  # the same source again: nothing to do
    assert again.already_imported and 'already imported, nothing written' in again.table()
    assert snapshot(imported) == before
    with open(imported / 'cifar-10-batches-py' / 'data_batch_2', 'ab') as f: f.write(b'x')
    with pytest.raises(FileExistsError):  # same source but a damaged copy: not silently kept
        import_cifar(src, 'cifar10', imported, progress=False)
    assert not import_cifar(src, 'cifar10', imported, force=True, progress=False).already_imported
    # another dataset's folder in the same data_dir is no conflict
    make_synthetic_cifar(imported, 'cifar100', n_train=100, n_test=100)
    assert data_source('cifar10', imported) == 'imported: src (lossless)' and data_source('cifar100', imported) == 'synthetic'


def test_damaged_imported_file_is_named_by_the_manifest_check(tmp_path):
    src = tmp_path / 'src'
    image_folder(src, CIFAR10_CLASSES)
    import_cifar(src, 'cifar10', tmp_path / 'data', progress=False)
    folder = tmp_path / 'data' / 'cifar-10-batches-py'
    want = data_manifest('cifar10', tmp_path / 'data')['md5']['data_batch_3']
    data = (folder / 'data_batch_3').read_bytes()
    (folder / 'data_batch_3').write_bytes(data[:len(data) // 2])  # truncated
    for train in (True, False):  # every split checks every file, as torchvision does
        with pytest.raises(RuntimeError) as err:
            load_cifar('cifar10', tmp_path / 'data', train=train, download=True)
        msg = str(err.value)
        found = hashlib.md5(data[:len(data) // 2]).hexdigest()
        assert f'data_batch_3: md5 {found} ({len(data) // 2:,} bytes), expected {want}' in msg
        assert 'data_batch_1' not in msg and 'Load with download=True' not in msg
        assert f'kd-data import {src} --dataset cifar10 --data-dir {tmp_path / "data"} --force' in msg
    (folder / 'test_batch').unlink()
    with pytest.raises(RuntimeError, match='test_batch: missing'):
        load_cifar('cifar10', tmp_path / 'data', train=False)


def test_download_true_repairs_a_damaged_official_data_file_but_not_the_meta_file(tmp_path):
    "torchvision re-extracts the archive when a data file fails its check; it never checks the meta file first"
    good = make_synthetic_cifar(tmp_path / 'good', 'cifar10', n_train=20, n_test=10)
    folder = good / 'cifar-10-batches-py'
    md5 = data_manifest('cifar10', good)['md5']
    (folder / MANIFEST).unlink()
    data_dir = tmp_path / 'data'
    shutil.copytree(folder, data_dir / 'cifar-10-batches-py')
    tv = torchvision.datasets.CIFAR10
    official = mock.patch.multiple(tv, train_list=[[f, md5[f]] for f, _ in tv.train_list],
                                   test_list=[['test_batch', md5['test_batch']]],
                                   meta={**tv.meta, 'md5': md5['batches.meta']})  # these files play the official ones

    def extract(url, root, filename=None, md5=None):  # what download_and_extract_archive does with a good archive
        shutil.copytree(folder, Path(root) / 'cifar-10-batches-py', dirs_exist_ok=True)

    with official, mock.patch('torchvision.datasets.cifar.download_and_extract_archive', side_effect=extract) as dl:
        with open(data_dir / 'cifar-10-batches-py' / 'data_batch_4', 'ab') as f: f.write(b'x')
        with pytest.raises(RuntimeError) as err:
            load_cifar('cifar10', data_dir, train=True, download=False)
        assert f"data_batch_4: md5" in str(err.value) and f"expected {md5['data_batch_4']}" in str(err.value)
        assert 'Load with download=True' in str(err.value) and dl.call_count == 0
        assert len(load_cifar('cifar10', data_dir, train=True, download=True)) == 20
        assert dl.call_count == 1
        assert (data_dir / 'cifar-10-batches-py' / 'data_batch_4').read_bytes() == (folder / 'data_batch_4').read_bytes()
        with open(data_dir / 'cifar-10-batches-py' / 'batches.meta', 'ab') as f: f.write(b'x')
        with pytest.raises(RuntimeError) as err:
            load_cifar('cifar10', data_dir, train=True, download=True)
        assert dl.call_count == 1  # torchvision saw intact data files: no download
        assert "would not replace batches.meta" in str(err.value) and 'batches.meta: md5' in str(err.value)


def test_offline_first_run_names_the_folder_files_and_the_offline_commands(tmp_path):
    "torchvision's own download code, with the network answering as it does offline"
    offline = urllib.error.URLError('[Errno -2] Name or service not known')
    with mock.patch('urllib.request.urlopen', side_effect=offline) as urlopen, pytest.raises(RuntimeError) as err:
        load_cifar('cifar10', tmp_path, train=False, download=True)
    assert urlopen.called
    msg = str(err.value)
    assert msg == no_data_message('cifar10', tmp_path, error=offline)
    for s in (f"'{tmp_path / 'cifar-10-batches-py'}'", 'data_batch_1, data_batch_2', 'test_batch, batches.meta',
              'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz', 'the download failed (URLError',
              f'kd-data import /path/to/cifar10-jpeg.tar.gz --dataset cifar10 --data-dir {tmp_path}',
              f'kd-data synthetic {tmp_path} --dataset cifar10', '5,000 training and 1,000 test images'):
        assert s in msg, (s, msg)


@pytest.mark.slow
def test_import_the_jpeg_copy_of_cifar10(tmp_path):
    archive = REAL_DATA / 'cifar10-jpeg.tar.gz'
    if not archive.is_file(): pytest.skip(f'{archive} is not here')
    start = time.perf_counter()
    report = import_cifar(archive, 'cifar10', tmp_path, progress=False)
    seconds = time.perf_counter() - start
    assert seconds < 120, seconds
    assert report.lossy and report.folder == tmp_path / 'cifar-10-batches-py'
    assert report.counts == {'train': dict.fromkeys(CIFAR10_CLASSES, 5000), 'test': dict.fromkeys(CIFAR10_CLASSES, 1000)}
    assert (report.duplicates['within_train'], report.duplicates['within_test'], report.duplicates['across_splits']) == (0, 0, 0)
    assert data_source('cifar10', tmp_path) == 'imported: cifar10-jpeg.tar.gz (lossy)'
    expected_sha = (REAL_DATA / 'SHA256SUMS').read_text().split()[0] if (REAL_DATA / 'SHA256SUMS').is_file() else None
    manifest = data_manifest('cifar10', tmp_path)
    if expected_sha: assert manifest['source']['sha256'] == expected_sha
    train = load_cifar('cifar10', tmp_path, train=True, download=False)
    test = load_cifar('cifar10', tmp_path, train=False, download=False)
    assert (len(train), len(test)) == (50000, 10000) and train.classes == list(CIFAR10_CLASSES)
    assert np.bincount(train.targets).tolist() == [5000] * 10 and np.bincount(test.targets).tolist() == [1000] * 10
    pixels = train.data.reshape(-1, 3)
    mean = np.array([pixels[:, c].mean() for c in range(3)]) / 255
    assert np.abs(mean - [0.4913, 0.4821, 0.4465]).max() < 2e-4, mean  # the README's figures for the JPEG copy
    assert np.abs(np.array(manifest['train_mean']) - mean).max() < 1e-4
    assert np.abs(np.array(manifest['train_std']) - [0.2452, 0.2428, 0.2606]).max() < 2e-4
    again = import_cifar(archive, 'cifar10', tmp_path, progress=False)
    assert again.already_imported
    print(f'\nCIFAR-10 (JPEG copy): 60,000 images imported in {seconds:.1f} s\n{report}')


def test_indexed_batches_name_their_samples():
    "`indexed()` yields each batch with its samples' positions in the loader's data set, and the same batches as iteration."
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8, generator=g), torch.arange(10) * 3
    loader = DeviceLoader(images, labels, 4, (0.5,) * 3, (0.25,) * 3, train=True, augment=False)
    loader.set_epoch(2)
    batches = list(loader.indexed())
    assert [len(i) for _, _, i in batches] == [4, 4, 2] and sorted(torch.cat([i for _, _, i in batches]).tolist()) == list(range(10))
    for (x, y, idx), (x2, y2) in zip(batches, loader):
        assert torch.equal(y, labels[idx]) and torch.equal(x, normalize_uint8(images[idx], loader.mean, loader.std))
        assert torch.equal(x, x2) and torch.equal(y, y2)
