"The fast training path against the loop written like the original SimKD code (kd_nb.reference), its switches, and the benchmark script."
import copy, json, subprocess, sys
from pathlib import Path
import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from conftest import ROOT, NOTEBOOK, quick_params

from kd_nb.data import make_loaders, load_cifar, dataset_info
from kd_nb.models import get_model
from kd_nb.distill import METHOD_DEFAULTS, make_distiller, student_parameters, teacher_from
from kd_nb.losses import LOSSES, list_losses
from kd_nb.trainer import TrainConfig, TrainStep, fit, train_step, make_optimizer, trainable_state
from kd_nb.hardware import as_input, available_cores
from kd_nb.reference import ReferenceSimKD


class FixedAugmentation(Dataset):
    "The torchvision PIL pipeline (pad 4, crop 32x32, flip, to tensor, normalize) with given offsets and flips."
    def __init__(self, ds, dx, dy, flip, info):
        self.ds, self.dx, self.dy, self.flip = ds, dx.tolist(), dy.tolist(), flip.tolist()
        self.finish = T.Compose([T.ToTensor(), T.Normalize(info.mean, info.std)])
    def __len__(self): return len(self.ds)
    def __getitem__(self, i):
        img, y = self.ds[i]
        img = T.functional.crop(T.functional.pad(img, 4), self.dy[i], self.dx[i], 32, 32)
        return self.finish(T.functional.hflip(img) if self.flip[i] else img), y


@pytest.fixture(scope='module')
def same_batches(synthetic_cifar100):
    "The run's DeviceLoader (augmenting on the device) and a PIL DataLoader with the very same order and augmentation."
    L = make_loaders('cifar100', synthetic_cifar100, batch_size=32, eval_batch_size=64, download=False, seed=0, train_limit=160)
    L.train.set_epoch(0)
    order, dx, dy, flip = L.train._draws()
    info = dataset_info('cifar100')
    kept = L.train.images  # the train_limit subset, as uint8 (N,3,H,W)
    ds = load_cifar('cifar100', synthetic_cifar100, train=True, download=False)
    index = {bytes(torch.from_numpy(img).permute(2, 0, 1).contiguous().numpy()): i for i, img in enumerate(ds.data)}
    subset = torch.utils.data.Subset(ds, [index[bytes(img.numpy())] for img in kept])
    pil = FixedAugmentation(subset, dx, dy, flip, info)
    ref_loader = DataLoader(pil, batch_size=32, sampler=order.tolist(), num_workers=2)
    xs_fast = torch.cat([x for x, _ in L.train]); xs_ref = torch.cat([x for x, _ in ref_loader])
    assert (xs_fast - xs_ref).abs().max() < 1e-5            # the same augmented images reach both loops
    return L, ref_loader


def models():
    torch.manual_seed(0)
    return make_distiller('simkd', get_model('resnet8'), get_model('resnet14'))


def reference_run(d, batches):
    "The original-style SimKD loop (kd_nb.reference) from the weights of `d`: its losses, batch sizes, student and projector."
    ref = ReferenceSimKD(copy.deepcopy(d.student), copy.deepcopy(d.teacher), lr=0.05,
                         transfer=copy.deepcopy(d.alignments[0].student_proj))
    losses, sizes = [], []
    for x, y in batches:
        losses.append(ref.step(x, y)); sizes.append(len(y))
    return losses, sizes, ref.model_s, ref.simkd.transfer


def body(model):
    "A model's weights without its classifier (the original loop decays SimKD's unused student classifier)."
    return [v for k, v in model.state_dict().items() if not k.startswith(model.head_name)]


def test_distill_step_is_the_original_computation(same_batches):
    "Fed the original pipeline's batches, kd-nb's step with the fast switches off repeats the original loop bit for bit."
    _, ref_loader = same_batches
    d = models()
    losses, _, student, projector = reference_run(d, ref_loader)
    cfg = TrainConfig(channels_last=False, fused_optimizer=False, amp='off', compile='off')
    opt, step = make_optimizer(student_parameters(d), cfg, 'cpu'), TrainStep(d)
    d.train()
    assert [train_step(step, x, y, opt).total.item() for x, y in ref_loader] == losses
    for a, b in zip([*body(d.student), *d.alignments[0].student_proj.state_dict().values()],
                    [*body(student), *projector.state_dict().values()]):
        assert torch.equal(a, b)


def trained(model):
    "The parameters both loops train the same way (a student's classifier aside)."
    head = getattr(model, 'head_name', None)
    return [p for n, p in model.named_parameters() if not (head and n.startswith(head))]


def update_gap(mine, ref, init) -> float:
    "|w_fast - w_ref| / |w_ref - w_0| over all parameters: the disagreement relative to how far training moved them."
    with torch.no_grad():
        gap = sum(float((a.double() - b.double()).norm() ** 2) for a, b in zip(trained(mine), trained(ref)))
        moved = sum(float((b.double() - w.double()).norm() ** 2) for b, w in zip(trained(ref), trained(init)))
    return (gap / moved) ** 0.5


def update_cosine(mine, ref, init) -> float:
    "Cosine between the two runs' weight updates w - w_0 over all parameters."
    with torch.no_grad():
        a = torch.cat([(p.double() - w.double()).flatten() for p, w in zip(trained(mine), trained(init))])
        b = torch.cat([(p.double() - w.double()).flatten() for p, w in zip(trained(ref), trained(init))])
    return float(a @ b / (a.norm() * b.norm()))


def fast_steps(d, loader, dtype=torch.float32):
    "The steps fit takes on the run's loader: channels-last model and inputs, foreach SGD, the teacher inside the step."
    fast = copy.deepcopy(d).to(dtype=dtype, memory_format=torch.channels_last)
    opt = make_optimizer(student_parameters(fast), TrainConfig(), 'cpu')
    assert opt.defaults['foreach'] is True
    step, losses = TrainStep(fast), []
    fast.train(); loader.set_epoch(0)
    for x, y in loader:
        x = as_input(x.to(dtype), True)
        assert x.is_contiguous(memory_format=torch.channels_last)
        losses.append(train_step(step, x, y, opt).total.item())
    return losses, fast


def test_fast_path_matches_original_style_loop(same_batches):
    L, ref_loader = same_batches
    d = models()
    losses, sizes, student, projector = reference_run(d, ref_loader)
    fast_losses, fast = fast_steps(d, L.train)
    assert len(fast_losses) == len(losses) == 5
    # the inputs differ by float rounding of the normalization (< 1e-5) and the convolutions round differently in
    # NHWC; batch-norm backward amplifies such rounding step by step, yet the losses agree to 1e-4
    assert fast_losses == pytest.approx(losses, rel=1e-4)
    assert abs(fast_losses[-1] - fast_losses[0]) > 1e-3       # the trajectory moves: the comparison is not trivial
    assert update_gap(fast.student, student, d.student) < 0.05

    # through fit itself, in fp32: one epoch on the same batches, the same mean loss and the same weights
    cfg = TrainConfig(epochs=1, lr=0.05, lr_milestones=(), progress=False, amp='off')
    d_fit = copy.deepcopy(d)
    hist = fit(d_fit, L.train, L.test, cfg, log=lambda s: None)
    assert hist[0]['train_loss'] == pytest.approx(sum(l * b for l, b in zip(losses, sizes)) / sum(sizes), rel=1e-4)
    assert update_gap(d_fit.student, student, d.student) < 0.05
    assert update_gap(d_fit.alignments[0].student_proj, projector, d.alignments[0].student_proj) < 0.05


def test_bf16_default_stays_close_to_the_fp32_loop(same_batches):
    "bf16 autocast (the default where the hardware has it) follows the fp32 original-style loop: its rounding, not another computation."
    L, ref_loader = same_batches
    d = models()
    losses, sizes, student, projector = reference_run(d, ref_loader)
    d_bf16 = copy.deepcopy(d)
    hist = fit(d_bf16, L.train, L.test, TrainConfig(epochs=1, lr=0.05, lr_milestones=(), progress=False, amp='bf16'),
               log=lambda s: None)
    mean_loss = sum(l * b for l, b in zip(losses, sizes)) / sum(sizes)
    assert hist[0]['train_loss'] == pytest.approx(mean_loss, rel=1e-2)
    assert hist[0]['train_loss'] != pytest.approx(mean_loss, rel=1e-6)   # it did compute in bf16
    assert update_cosine(d_bf16.student, student, d.student) > 0.95              # the weights move the same way
    assert all(p.dtype == torch.float32 for p in d_bf16.parameters())     # fp32 master weights


def test_fast_path_is_the_same_computation_in_float64(same_batches):
    "In float64 the rounding vanishes: fast path and original-style loop then agree to 1e-6 after every step."
    L, ref_loader = same_batches
    d = models().double()
    losses, _, student, _ = reference_run(d, [(x.double(), y) for x, y in ref_loader])
    fast_losses, fast = fast_steps(d, L.train, torch.float64)
    assert fast_losses == pytest.approx(losses, rel=1e-6)
    assert update_gap(fast.student, student, d.student) < 1e-5


def test_compile_failure_falls_back_to_eager(same_batches, monkeypatch):
    L, _ = same_batches
    cfg = dict(epochs=1, lr_milestones=(), progress=False)
    eager = fit(models(), L.train, L.test, TrainConfig(compile='off', **cfg), log=lambda s: None)
    def broken(fn, **kw):
        def compiled(*a, **k): raise RuntimeError('inductor backend unavailable')
        return compiled
    monkeypatch.setattr(torch, 'compile', broken)
    logs = []
    fallback = fit(models(), L.train, L.test, TrainConfig(compile='on', **cfg), log=logs.append)
    assert any('running eagerly' in m and 'inductor backend unavailable' in m for m in logs)
    keys = ('train_loss', 'train_acc1', 'test_acc1', 'test_loss')
    assert [r[k] for r in fallback for k in keys] == [r[k] for r in eager for k in keys]


COMPILED = [('method', m) for m in METHOD_DEFAULTS] + [('loss', n) for n in list_losses()] + [('scheme', 'online')]


def compile_case(kind, name):
    "A distiller of every method with its own losses, or SimKD (KD for a logit loss) with one registered loss."
    torch.manual_seed(0)
    if kind == 'scheme':   # a teacher trained online with the student, in its warm-up
        return make_distiller('simkd', get_model('resnet8'), get_model('resnet14'), teacher_mode='online', online_warmup=2)
    if kind == 'method':
        teacher = {'given': 'resnet14', 'student': 'resnet8'}.get(teacher_from(name))
        return make_distiller(name, get_model('resnet8'), teacher and get_model(teacher))
    losses = ['l2', name] if LOSSES[name].kind == 'stages' else [name]
    return make_distiller('kd' if LOSSES[name].kind == 'logits' else 'simkd', get_model('resnet8'), get_model('resnet14'),
                          losses=losses, num_samples=320)


@pytest.mark.slow
@pytest.mark.parametrize('kind,name', COMPILED, ids=[f'{k}-{n}' for k, n in COMPILED])
def test_torch_compile_captures_every_step_whole(kind, name, synthetic_cifar100, monkeypatch):
    "torch.compile traces the training step and the evaluation of every method, learning scheme and loss as graphs without a break, and trains and evaluates as eager does."
    import torch._dynamo
    from torch._dynamo.utils import counters
    L = make_loaders('cifar100', synthetic_cifar100, batch_size=32, eval_batch_size=160, download=False, seed=0, train_limit=64)
    cfg = dict(epochs=1, lr_milestones=(), progress=False, amp='off')
    eager_model = compile_case(kind, name)
    eager = fit(eager_model, L.train, L.test, TrainConfig(compile='off', **cfg), log=lambda s: None)
    graphs, logs, compile = [], [], torch.compile
    def recording(gm, example_inputs):   # a backend that keeps the traced graph and runs it as traced
        graphs.append((gm, not torch.is_grad_enabled())); return gm.forward   # traced without gradient: the evaluation
    monkeypatch.setattr(torch, 'compile', lambda fn, **options: compile(fn, backend=recording))
    torch._dynamo.reset(); counters.clear()
    compiled_model = compile_case(kind, name)
    compiled = fit(compiled_model, L.train, L.test, TrainConfig(compile='on', **cfg), log=logs.append)
    assert not counters['graph_break'] and not [m for m in logs if 'torch.compile' in m]
    assert any(not evaluation for _, evaluation in graphs) and any(evaluation for _, evaluation in graphs)   # the step and the evaluation
    keys = ('train_loss', 'train_acc1', 'test_acc1', 'test_loss')
    assert [r[k] for r in compiled for k in keys] == pytest.approx([r[k] for r in eager for k in keys], rel=1e-5, abs=1e-6)
    for k, v in trainable_state(eager_model).items():
        assert torch.allclose(trainable_state(compiled_model)[k].float(), v.float(), rtol=1e-4, atol=1e-5), k



@pytest.mark.slow
def test_cuda_graph_steps_see_one_shape(synthetic_cifar100, monkeypatch):
    "In the CUDA-graph step mode (forced here on the CPU) training drops the short batch and evaluation pads it: every traced step and evaluation sees one batch size, and the run trains as an eager run that drops that batch."
    import torch._dynamo
    import kd_nb.trainer as trainer
    L = make_loaders('cifar100', synthetic_cifar100, batch_size=96, eval_batch_size=64, download=False, seed=0)  # 320 = 3 * 96 + 32; 160 = 2 * 64 + 32
    cfg = dict(epochs=2, lr_milestones=(1,), progress=False, amp='off')
    batches, logs, compile = set(), [], torch.compile
    def recording(gm, example_inputs):
        batches.update(t.shape[0] for t in example_inputs if isinstance(t, torch.Tensor) and t.shape[1:] == (3, 32, 32))   # the images
        return gm.forward
    monkeypatch.setattr(torch, 'compile', lambda fn, **options: compile(fn, backend=recording))
    monkeypatch.setattr(trainer, 'step_mode', lambda cfg, device, graphable=True: 'cuda_graphs' if graphable else 'compiled')
    torch._dynamo.reset()
    graphed = fit(models(), L.train, L.test, TrainConfig(compile='on', compile_mode='reduce-overhead', **cfg), log=logs.append)
    assert batches == {96, 64} and L.train.drop_last and any('leaves out its last 32 images' in m for m in logs)
    assert [r['train_samples'] for r in graphed] == [288, 288]
    monkeypatch.undo()
    eager = fit(models(), L.train, L.test, TrainConfig(compile='off', **cfg), log=lambda s: None)   # the same loader: it drops the batch too
    keys = ('train_loss', 'train_acc1', 'test_acc1', 'test_loss', 'lr')
    assert [r[k] for r in graphed for k in keys] == pytest.approx([r[k] for r in eager for k in keys], rel=1e-5, abs=1e-6)

def test_bf16_autocast_keeps_fp32_master_weights(same_batches):
    L, _ = same_batches
    cfg = dict(epochs=1, lr_milestones=(), progress=False)
    fp32 = fit(models(), L.train, L.test, TrainConfig(amp='off', **cfg), log=lambda s: None)
    d = models()
    bf16 = fit(d, L.train, L.test, TrainConfig(amp='bf16', **cfg), log=lambda s: None)
    assert all(v.dtype in (torch.float32, torch.int64) for v in trainable_state(d).values())
    assert bf16[0]['train_loss'] == pytest.approx(fp32[0]['train_loss'], rel=0.05)   # bf16 rounding, same computation
    assert bf16[0]['train_loss'] != fp32[0]['train_loss']                              # and autocast really was on


@pytest.mark.slow
def test_papermill_switches_reach_the_run(synthetic_cifar100, tmp_path):
    params = quick_params(synthetic_cifar100, tmp_path, method='scratch', student='resnet8', epochs=1, run_name='eager')
    args = [sys.executable, '-m', 'papermill', str(NOTEBOOK), str(tmp_path / 'o.ipynb'), '--cwd', str(ROOT), '--no-progress-bar']
    args += sum((['-p', k, str(v)] for k, v in params.items()), [])
    args += ['-p', 'amp', 'off', '-p', 'compile', 'off', '-p', 'channels_last', 'false', '-p', 'fused_optimizer', 'False',
             '-p', 'eval_batch_size', '100', '-p', 'fast_data', 'no', '-p', 'num_workers', '0',
             '-p', 'threads', str(available_cores() + 1)]   # more threads than cores: set_threads warns
    subprocess.run(args, check=True, capture_output=True)
    printed = ''.join(''.join(o.get('text', '')) for c in json.loads((tmp_path / 'o.ipynb').read_text())['cells']
                      for o in c.get('outputs', []))
    assert 'kd_nb/experiment.py:' in printed and 'UserWarning: threads:' in printed   # the warning, named from the root
    assert str(ROOT) not in printed, printed
    p = json.loads((tmp_path / 'eager' / 'config.json').read_text())['params']
    assert (p['amp'], p['compile'], p['channels_last'], p['fused_optimizer'], p['eval_batch_size'], p['fast_data']) == \
        ('off', 'off', False, False, 100, False)
    assert json.loads((tmp_path / 'eager' / 'summary.json').read_text())['status'] == 'done'


@pytest.mark.slow
def test_benchmark_script_writes_all_figures(tmp_path):
    out = tmp_path / 'bench.json'
    r = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'bench_simkd.py'), '--device', 'cpu', '--steps', '3',
                        '--batch-size', '16', '--teacher', 'resnet14', '--student', 'resnet8', '--warmup', '1',
                        '--workers', '0', '--eval-images', '64', '--split-steps', '1', '--out', str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res['device'] == 'cpu' and res['device_name'] and res['config']['teacher'] == 'resnet14'
    for path in ('reference', 'fast'):
        figures = res[path]
        assert figures['train_images_per_s'] > 0 and figures['eval_images_per_s'] > 0 and figures['recipe_minutes'] > 0
        assert set(figures['split_ms_per_step']) == {'data', 'teacher', 'student', 'optimizer'}
        assert all(v >= 0 for v in figures['split_ms_per_step'].values())
    assert res['memory']['kind'] == 'cpu_max_rss_process' and res['memory']['cpu_max_rss_mb'] > 0
    assert set(res['ratio']) == {'train', 'eval', 'recipe', 'train_median_of_rounds'}
    assert res['ratio']['train'] == pytest.approx(res['fast']['train_images_per_s'] / res['reference']['train_images_per_s'])
    rows = out.with_suffix('.csv').read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith('path,device')
    assert 'train images/s' in r.stdout and 'fast/ref' in r.stdout


@pytest.mark.slow
def test_device_check_runs_every_part_on_the_cpu(tmp_path):
    "benchmarks/device_check.py end to end in its smoke mode (a few steps on the CPU): the GPU call runs the same code."
    r = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'device_check.py'), '--out', str(tmp_path), '--smoke',
                        '--accuracy', '--concurrency', '1,2'], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    rep = json.loads((tmp_path / 'device_check.json').read_text())
    assert rep['smoke'] and rep['device'] == 'cpu' and rep['graph_rng']['new_draws_every_replay']
    assert set(rep['speed']) == {'eager', 'compiled', 'cuda_graphs'}
    for mode, s in rep['speed'].items():
        assert s['train_ratio'] > 0 and s['fast_recipe_minutes'] > 0 and (tmp_path / s['file']).is_file()
    assert [rep['speed'][m]['fast_settings']['step_mode'] for m in ('eager', 'compiled', 'cuda_graphs')] == ['eager', 'compiled', 'compiled']  # no graphs on a CPU
    runs = rep['accuracy']['runs']
    assert [x['seed'] for x in runs] == [0, 1] and all(x['status'] == 'done' and x['peak_memory_mb'] > 0 for x in runs)
    assert all(x['cpu_best_test_acc'] is not None and x['best_test_acc'] is not None for x in runs)   # beside the committed CPU runs
    rows = rep['concurrency']['rows']
    assert [x['runs'] for x in rows] == [1, 2] and all(x['done'] == x['runs'] and x['aggregate_images_per_s'] > 0 for x in rows)
    assert all(m > 0 for x in rows for m in x['peak_memory_mb'])
    assert r.stdout.lstrip().startswith('plan') and 'full recipe' in r.stdout and 'projected' in r.stdout
