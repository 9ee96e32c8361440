"Multi-process training: two CPU processes under torchrun (Gloo) against a single-process emulation of the same steps."
import json, os, re, subprocess, sys, textwrap
from pathlib import Path
import pytest
import torch
from conftest import ROOT

pytestmark = pytest.mark.slow   # papermill or torchrun runs: `pytest -m 'not slow'` leaves them out

WORKER = textwrap.dedent('''
    import sys, torch
    from pathlib import Path
    import kd_nb.trainer as tr, kd_nb.runs as runs
    from kd_nb.trainer import TrainConfig, fit, trainable_state
    from kd_nb.hardware import world
    from kd_nb.experiment import run_experiment
    from kd_nb.models import get_model
    from kd_nb.distill import make_distiller
    from kd_nb.data import make_loaders
    out, data = Path(sys.argv[1]), sys.argv[2]
    writes = []  # every checkpoint and metrics file this process writes
    for module, name in ((tr, 'atomic_save'), (runs, 'write_metrics')):
        original = getattr(module, name)
        setattr(module, name, lambda obj, path, _o=original: (writes.append(str(path)), _o(obj, path)))
    L = make_loaders('cifar100', data, batch_size=32, eval_batch_size=64, download=False, seed=0)
    torch.manual_seed(0)
    d = make_distiller('simkd', get_model('resnet8'), get_model('resnet14'))
    history = fit(d, L.train, L.test, TrainConfig(epochs=2, lr_milestones=(1,), progress=False), out / 'fit', log=lambda s: None)
    schemes = {}   # the learning schemes that train more than one network, and a loss with its own optimizer
    for name, method, teacher, knobs in (('dml', 'dml', None, {}), ('online', 'simkd', 'resnet14', dict(teacher_mode='online', online_warmup=0)),
                                         ('crd', 'simkd', 'resnet14', dict(losses=['crd'], num_samples=L.train.num_samples))):
        torch.manual_seed(0)
        other = make_distiller(method, get_model('resnet8'), teacher and get_model(teacher), **knobs)
        h = fit(other, L.train, L.test, TrainConfig(epochs=1, progress=False), out / name, log=lambda s: None)
        schemes[name] = {'state': trainable_state(other), 'history': h}
    rank, size = world()
    summary = run_experiment(log=lambda *a: None, data_dir=data, download=False, teacher='resnet14', student='resnet8',
                             preset='quick', epochs=1, train_limit=0, test_limit=0, device='cpu', runs_dir=str(out / 'runs'),
                             run_name='ddp', progress=False)
    torch.save({'state': trainable_state(d), 'history': history, 'writes': writes, 'world': size, 'summary': summary, 'schemes': schemes},
               out / f'rank{rank}.pt')
''')


@pytest.fixture(scope='module')
def two_processes(synthetic_cifar100, tmp_path_factory):
    "Run the worker under torchrun with 2 CPU processes; the folder with its outputs."
    out = tmp_path_factory.mktemp('ddp')
    (out / 'worker.py').write_text(WORKER)
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           str(out / 'worker.py'), str(out), str(synthetic_cifar100)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def files(folder):
    "The files of a run folder, the TensorBoard event files and the lock aside."
    return sorted(p.name for p in Path(folder).iterdir() if not p.name.startswith(('events.', '.')))


def ranks(out):
    return [torch.load(out / f'rank{r}.pt', weights_only=False) for r in (0, 1)]


def test_both_processes_end_with_identical_weights(two_processes):
    r0, r1 = ranks(two_processes)
    assert r0['world'] == r1['world'] == 2
    assert r0['state'].keys() == r1['state'].keys()
    for k in r0['state']:
        assert torch.equal(r0['state'][k], r1['state'][k]), k       # parameters and batch-norm buffers
    assert r0['history'] == [{**row, 'epoch_time_s': a['epoch_time_s'], 'images_per_s': a['images_per_s']}
                             for row, a in zip(r1['history'], r0['history'])]  # the same metrics on both


@pytest.mark.parametrize('scheme', ['dml', 'online', 'crd'])
def test_every_trained_network_stays_identical_across_processes(two_processes, scheme):
    "Mutual learning's peers, an online teacher and a loss with its own optimizer train in step on both processes."
    r0, r1 = (r['schemes'][scheme] for r in ranks(two_processes))
    trained = {'dml': 'peers.1.', 'online': 'teacher.', 'crd': 'feature_losses.'}[scheme]
    assert any(k.startswith(trained) for k in r0['state']), sorted(r0['state'])[:8]
    for k in r0['state']: assert torch.equal(r0['state'][k], r1['state'][k]), k
    assert [row['test_acc1'] for row in r0['history']] == [row['test_acc1'] for row in r1['history']]


def test_only_rank_zero_writes(two_processes):
    r0, r1 = ranks(two_processes)
    assert r1['writes'] == [] and r1['summary'] is None
    assert sorted({Path(p).name for p in r0['writes']}) == ['best.pt', 'last.pt', 'metrics.csv']
    assert files(two_processes / 'fit') == ['best.pt', 'last.pt', 'metrics.csv']
    assert len(list((two_processes / 'fit').glob('events.*'))) == 1          # TensorBoard scalars, from rank 0 alone
    runs = two_processes / 'runs'
    assert sorted(p.name for p in runs.iterdir()) == ['ddp', 'teachers']     # one run folder, one teacher
    [teacher] = [p.name for p in (runs / 'teachers').iterdir()]
    assert re.fullmatch(r'cifar100-resnet14-e1-n0-s0-[0-9a-f]{8}', teacher), teacher   # <data>-<arch>-e<E>-n<N>-s<seed>-<recipe digest>
    assert files(runs / 'ddp') == ['best.pt', 'config.json', 'last.pt', 'metrics.csv', 'summary.json']
    summary = json.loads((runs / 'ddp' / 'summary.json').read_text())
    assert summary['status'] == 'done' and summary['epochs'] == 1 and summary == r0['summary']
    assert json.loads((runs / 'ddp' / 'config.json').read_text())['world_size'] == 2


def emulate_two_processes(distiller, loader, test_loader, epochs, milestones):
    """The DDP steps in one process: each half-batch through the same weights, gradients averaged, batch-norm
    statistics of the first half kept (DDP broadcasts rank 0's buffers before every step)."""
    from kd_nb.trainer import TrainConfig, make_optimizer, seed_everything, evaluate
    from kd_nb.hardware import amp_dtype, autocast
    from kd_nb.distill import student_parameters, trained_modules
    cfg = TrainConfig(epochs=epochs, lr_milestones=milestones)
    amp = amp_dtype(cfg.amp, 'cpu')  # the default precision, as the torchrun processes use it
    seed_everything(0, True)
    distiller.to(memory_format=torch.channels_last)
    opt = make_optimizer(student_parameters(distiller), cfg, 'cpu')
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=0.1)
    buffers = [b for m in trained_modules(distiller) for b in m.buffers()]
    history = []
    for epoch in range(epochs):
        loader.set_epoch(epoch); distiller.train()
        loss_sum = correct = n = 0
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            start = [b.clone() for b in buffers]
            for xs, ys in reversed(list(zip(x.tensor_split(2), y.tensor_split(2)))):   # rank 1, then rank 0
                for b, s in zip(buffers, start): b.copy_(s)
                with autocast('cpu', amp): out = distiller.step(xs.contiguous(memory_format=torch.channels_last), ys)
                (out.total / 2).backward()
                loss_sum += out.total.item() * len(ys); correct += int((out.logits.argmax(1) == ys).sum()); n += len(ys)
            opt.step()
        sched.step()
        history.append({'train_loss': loss_sum / n, 'train_acc1': 100 * correct / n,
                        **evaluate(distiller, test_loader, channels_last=True, amp=amp)})
    return history


def test_matches_single_process_emulation(two_processes, synthetic_cifar100):
    from kd_nb.trainer import trainable_state
    from kd_nb.models import get_model
    from kd_nb.distill import make_distiller
    from kd_nb.data import make_loaders
    L = make_loaders('cifar100', synthetic_cifar100, batch_size=32, eval_batch_size=64, download=False, seed=0)
    torch.manual_seed(0)
    d = make_distiller('simkd', get_model('resnet8'), get_model('resnet14'))
    head = d.student.fc.weight.detach().clone()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as each torchrun process: the same kernels, so the same rounding
    try: expected = emulate_two_processes(d, L.train, L.test, epochs=2, milestones=(1,))
    finally: torch.set_num_threads(threads)
    r0, _ = ranks(two_processes)
    for got, want in zip(r0['history'], expected):
        for k in ('train_loss', 'test_loss'): assert got[k] == pytest.approx(want[k], rel=1e-6), k
        for k in ('train_acc1', 'test_acc1', 'test_acc5'): assert got[k] == want[k], k
    state = trainable_state(d)
    for k, v in r0['state'].items():
        assert torch.allclose(v.float(), state[k].float(), rtol=1e-5, atol=1e-6), k
    assert torch.equal(r0['state']['student.fc.weight'], head)   # SimKD's unused student head is left untouched
