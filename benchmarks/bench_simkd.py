"""SimKD training and evaluation speed: a loop written like the original SimKD/RepDistiller code against kd-nb's fast path.

Both run in this one process, on the same device, with the same teacher and student, batch size and data; their timed
training steps alternate in rounds, so a machine that speeds up or slows down during the run affects both alike.

    python benchmarks/bench_simkd.py                       # GPU: one full epoch each; CPU: 16 steps each
    python benchmarks/bench_simkd.py --device cpu --steps 16 --teacher resnet32x4 --student resnet8x4

Prints and writes (JSON and CSV, `--out`) for each path: training images/s, evaluation images/s, peak memory, the time
per training step split into data / teacher forward / student+projector forward+backward / optimizer, and the minutes
the full recipe (240 epochs of 50,000 training and 10,000 test images) would take at the measured speeds.
"""
import argparse, csv, json, os, resource, socket, statistics, tempfile, time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import kd_nb
from kd_nb.data import make_synthetic_cifar, load_cifar, train_transform, test_transform, make_loaders, dataset_info, data_source
from kd_nb.models import get_model
from kd_nb.reference import ReferenceSimKD
from kd_nb.experiment import resolve_config, build_distiller, train_config, git_commit
from kd_nb.hardware import autocast, as_input, device_name
from kd_nb.trainer import PRESETS, RECIPE_BATCH, prepare, train_step, evaluate_all, recipe_lr, resolve_deterministic

ROOT = Path(__file__).resolve().parents[1]
RECIPE = dict(epochs=PRESETS['paper']['epochs'], train_images=50_000, test_images=10_000)   # CIFAR's 50,000 / 10,000 images
PHASES = ('data', 'teacher', 'student', 'optimizer')


def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize(device)


def endless(loader, on_new_epoch=None):
    "Batches of `loader` without end, a new epoch (new iterator) when one is exhausted."
    epoch = 0
    while True:
        if on_new_epoch is not None: on_new_epoch(epoch)
        yield from loader
        epoch += 1


# ---------------------------------------------------------------------------------------------------------------------
# (a) the reference: kd_nb.reference.ReferenceSimKD (a loop written like SimKD's train_student.py / helper/loops.py)
#     fed by torchvision PIL transforms in DataLoader workers, as the original code is

class Reference:
    "SimKD trained as the original code trains it: PIL transforms in DataLoader workers, fp32, NCHW, default SGD."
    name = 'reference'

    def __init__(self, teacher, student, data_dir, batch_size, workers, device, lr, dataset='cifar100'):
        self.device = device
        train_set = load_cifar(dataset, data_dir, train=True, transform=train_transform(dataset), download=False)
        test_set = load_cifar(dataset, data_dir, train=False, transform=test_transform(dataset), download=False)
        self.train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=workers)
        self.test_loader = DataLoader(test_set, batch_size=max(1, batch_size // 2), shuffle=False, num_workers=workers // 2)
        self.loop = ReferenceSimKD(student.to(device), teacher.to(device), lr=lr)
        if device.type == 'cuda': torch.backends.cudnn.benchmark = True
        self.batches = endless(self.train_loader)

    def _to_device(self, input, target):
        input = input.float()
        if self.device.type == 'cuda': input, target = input.cuda(self.device), target.cuda(self.device)
        return input, target

    def _next(self, n=None):
        input, target = next(self.batches)
        if n is not None: input, target = input[:n], target[:n]
        return self._to_device(input, target)

    def train_steps(self, k, last_size=None):
        for _ in range(k): self.loop.step(*self._next())
        if last_size: self.loop.step(*self._next(last_size))
        sync(self.device)

    def split_steps(self, k):
        "Per-phase seconds of `k` steps, each phase ended by a device synchronization."
        total = dict.fromkeys(PHASES, 0.0)
        for _ in range(k):
            sync(self.device); t = [time.perf_counter()]
            batch = self._next(); sync(self.device); total['data'] += time.perf_counter() - t[0]; t[0] = time.perf_counter()
            def mark(phase):
                sync(self.device); now = time.perf_counter(); total[phase] += now - t[0]; t[0] = now
            self.loop.step(*batch, mark=mark)
        return {p: v / k for p, v in total.items()}

    def eval_pass(self):
        "validate_distill of the original SimKD: student, teacher (for its features) and the SimKD module per batch."
        n = self.loop.evaluate(self._to_device(x, y) for x, y in self.test_loader)
        sync(self.device)
        return n


# ---------------------------------------------------------------------------------------------------------------------
# (b) kd-nb's fast path, set up as `fit` sets it up for a run with these knobs

class FastPath:
    name = 'fast'

    def __init__(self, teacher, student, data_dir, batch_size, device, knobs, log, dataset='cifar100'):
        self.device, self.dataset = device, dataset
        self.cfg = resolve_config(**{**knobs, 'dataset': dataset, 'teacher': teacher, 'student': student,
                                     'batch_size': batch_size, 'data_dir': str(data_dir), 'download': False,
                                     'train_limit': 0, 'test_limit': 0})
        self.tcfg = train_config(self.cfg)
        self.loaders = make_loaders(dataset, data_dir, batch_size=batch_size, eval_batch_size=self.cfg['eval_batch_size'],
                                    fast=True, device=device, seed=0, download=False)
        classes = self.loaders.info.num_classes
        self.teacher = get_model(teacher, classes).to(device).eval()
        torch.manual_seed(0)
        self.distiller = build_distiller(self.cfg, get_model(student, classes), self.teacher).to(device)
        self.prepared = prepare(self.distiller, self.tcfg, device, log)   # what fit sets up, in fit's order
        self.amp, self.opt, self.aux_opt = self.prepared.amp, self.prepared.opt, self.prepared.aux_opt
        self.eager, self.step, self.compiled = self.prepared.eager, self.prepared.step, self.prepared.compiled
        self.batches = endless(self.loaders.train, self.loaders.train.set_epoch)
        self.sums = None

    @property
    def settings(self):
        t = self.tcfg
        return dict(channels_last=t.channels_last, amp=str(self.amp).replace('torch.', '') if self.amp else 'fp32',
                    fused_optimizer=t.fused_optimizer, optimizer=('fused' if self.opt.defaults.get('fused') else
                    'foreach' if self.opt.defaults.get('foreach') else 'for-loop'),
                    compile=self.compiled, compile_mode=t.compile_mode if self.compiled else None, step_mode=self.prepared.mode,
                    deterministic=resolve_deterministic(t.deterministic, self.device),
                    eval_batch_size=self.cfg['eval_batch_size'], data='DeviceLoader (uint8 on the device)')

    def _next(self, n=None):
        x, y = next(self.batches)
        if n is not None: x, y = x[:n], y[:n]
        return as_input(x, self.tcfg.channels_last), y

    def train_steps(self, k, last_size=None):
        self.distiller.train()
        for _ in range(k + bool(last_size)):
            x, y = self._next(last_size if _ == k else None)
            self.prepared.mark_step()
            out = train_step(self.step, x, y, self.opt, self.aux_opt, self.amp)
            s = torch.stack([out.total.detach().double() * len(y), (out.logits.detach().argmax(1) == y).sum().double()])
            self.sums = s if self.sums is None else self.sums + s  # fit's on-device running sums
        sync(self.device)

    def split_steps(self, k):
        "Per-phase seconds of `k` eager steps; the teacher's forward is timed inside the step."
        self.distiller.train()
        total = dict.fromkeys(PHASES, 0.0)
        teacher_forward = self.teacher.forward_features
        def timed_teacher(x):
            sync(self.device); t0 = time.perf_counter()
            out = teacher_forward(x)
            sync(self.device); total['teacher'] += time.perf_counter() - t0
            return out
        self.teacher.forward_features = timed_teacher
        try:
            for _ in range(k):
                sync(self.device); t0 = time.perf_counter()
                x, y = self._next(); sync(self.device); t1 = time.perf_counter()
                with autocast(self.device, self.amp): total_loss, out = self.eager(x, y)
                self.opt.zero_grad(set_to_none=True); total_loss.backward(); sync(self.device); t2 = time.perf_counter()
                self.opt.step(); sync(self.device); t3 = time.perf_counter()
                total['data'] += t1 - t0; total['student'] += t2 - t1; total['optimizer'] += t3 - t2
        finally:
            del self.teacher.forward_features
        total['student'] -= total['teacher']
        return {p: v / k for p, v in total.items()}

    def eval_pass(self):
        evaluate_all(self.distiller, self.loaders.test, channels_last=self.tcfg.channels_last, amp=self.amp, p=self.prepared)
        sync(self.device)
        return self.loaders.test.num_samples


# ---------------------------------------------------------------------------------------------------------------------

class Memory:
    "Peak memory of each path: CUDA bytes allocated above what was live before its timed work, plus its resident state."
    def __init__(self, device): self.device, self.peak, self.resident = device, {}, {}

    def allocated(self): return torch.cuda.memory_allocated(self.device) if self.device.type == 'cuda' else 0

    def track(self, name, fn):
        if self.device.type != 'cuda': return fn()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = self.allocated()
        out = fn()
        extra = torch.cuda.max_memory_allocated(self.device) - before
        self.peak[name] = max(self.peak.get(name, 0), extra + self.resident.get(name, 0))
        return out


def rss_mb(who=resource.RUSAGE_SELF): return resource.getrusage(who).ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    p.add_argument('--steps', type=int, default=None,
                   help='timed training steps per path; 0: one full epoch (default: 0 on CUDA, 16 on CPU)')
    p.add_argument('--batch-size', type=int, default=RECIPE_BATCH)
    p.add_argument('--teacher', default='resnet32x4')
    p.add_argument('--student', default='resnet8x4')
    p.add_argument('--warmup', type=int, default=None, help='untimed steps per path first (default: 20 on CUDA, 3 on CPU)')
    p.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader workers of the reference (the original code's default is 8)")
    p.add_argument('--rounds', type=int, default=None,
                   help='alternating rounds the timed steps are split into (default: one step per round on CPU, 1 on CUDA)')
    p.add_argument('--split-steps', type=int, default=None, help='extra synchronized steps per path for the time split (default: 20 on CUDA, 3 on CPU)')
    p.add_argument('--eval-images', type=int, default=None, help='test images per evaluation pass (default: 10000 on CUDA, 512 on CPU)')
    p.add_argument('--dataset', default='cifar100', choices=['cifar10', 'cifar100'], help='the data set of --data-dir (default: cifar100)')
    p.add_argument('--data-dir', default=None, help='a folder with the data set (e.g. cifar-100-python/; default: synthetic CIFAR-100-shaped data)')
    p.add_argument('--amp', default=None, help="the fast path's amp knob (default: the run default, 'auto')")
    p.add_argument('--compile', default=None, help="the fast path's compile knob (default: 'auto')")
    p.add_argument('--compile-mode', default=None, help="the fast path's compile_mode knob, e.g. reduce-overhead (default: 'default')")
    p.add_argument('--channels-last', default=None, choices=['True', 'False'], help='the fast path\'s channels_last knob (default: True)')
    p.add_argument('--out', default=None, help='result JSON path (default: benchmarks/results/<device>-<timestamp>.json); a CSV is written next to it')
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    device = torch.device('cuda' if a.device == 'auto' and torch.cuda.is_available() else 'cpu' if a.device == 'auto' else a.device)
    gpu = device.type == 'cuda'
    steps = a.steps if a.steps is not None else (0 if gpu else 16)
    warmup = a.warmup if a.warmup is not None else (20 if gpu else 3)
    rounds = 1 if steps == 0 else max(1, min(steps, a.rounds if a.rounds is not None else (1 if gpu else steps)))
    split_steps = a.split_steps if a.split_steps is not None else (20 if gpu else 3)
    eval_images = a.eval_images if a.eval_images is not None else (10_000 if gpu else 512)
    bs = a.batch_size
    knobs = {k: v for k, v in dict(amp=a.amp, compile=a.compile, compile_mode=a.compile_mode, device=device.type,
                                   channels_last=None if a.channels_last is None else a.channels_last == 'True').items() if v is not None}
    log = lambda *s: print(*s, flush=True)

    tmp = tempfile.TemporaryDirectory()
    dataset = a.dataset if a.data_dir else 'cifar100'
    if a.data_dir: data_dir, data = Path(a.data_dir), f'{dataset} from {a.data_dir} ({data_source(dataset, a.data_dir)})'
    else:
        n_train = RECIPE['train_images'] if steps == 0 else (warmup + steps + split_steps + 1) * bs
        data_dir = make_synthetic_cifar(tmp.name, 'cifar100', n_train=n_train, n_test=eval_images, seed=0)
        data = f'synthetic CIFAR-100-shaped ({n_train} train / {eval_images} test images)'
    lr = recipe_lr(a.student, bs, 'paper')
    mem = Memory(device)

    log(f'device: {device} ({device_name(device)}), torch {torch.__version__}, {torch.get_num_threads()} threads; data: {data}')
    before = mem.allocated()
    torch.manual_seed(0)
    classes = dataset_info(dataset).num_classes
    ref = Reference(get_model(a.teacher, classes), get_model(a.student, classes), data_dir, bs, a.workers, device, lr, dataset)
    mem.resident['reference'] = mem.allocated() - before
    before = mem.allocated()
    fast = FastPath(a.teacher, a.student, data_dir, bs, device, knobs, log, dataset)
    mem.resident['fast'] = mem.allocated() - before
    if a.data_dir and eval_images < len(ref.test_loader.dataset):  # a real test set: evaluate the first `eval_images`
        sub = list(range(eval_images))
        ref.test_loader = DataLoader(torch.utils.data.Subset(ref.test_loader.dataset, sub), batch_size=ref.test_loader.batch_size,
                                     num_workers=ref.test_loader.num_workers)
        fast.loaders = make_loaders(dataset, data_dir, batch_size=bs, eval_batch_size=fast.cfg['eval_batch_size'],
                                    fast=True, device=device, seed=0, download=False, test_limit=eval_images)
    epoch_steps = len(ref.train_loader)
    timed = epoch_steps if steps == 0 else steps
    last = len(ref.train_loader.dataset) % bs if steps == 0 else 0  # the epoch's short last batch

    log(f'warm-up: {warmup} steps per path' + (' (+ one short batch, so compilation is not timed)' if last or fast.compiled else ''))
    for path in (ref, fast):
        mem.track(path.name, lambda: path.train_steps(warmup, last_size=last or (bs // 2 if fast.compiled else None)))
    if steps == 0:  # a full epoch each: start both at an epoch boundary
        ref.batches, fast.batches = endless(ref.train_loader), endless(fast.loaders.train, fast.loaders.train.set_epoch)
    times, per_round = {'reference': 0.0, 'fast': 0.0}, {'reference': [], 'fast': []}
    chunks = [timed // rounds + (i < timed % rounds) for i in range(rounds)]
    load_before = os.getloadavg()
    for r, k in enumerate(chunks):
        for path in ((ref, fast) if r % 2 == 0 else (fast, ref)):  # alternate who goes first: drift hits both alike
            is_last = steps == 0  # a full epoch ends with its short batch
            t0 = time.perf_counter()
            mem.track(path.name, lambda: path.train_steps(k - bool(is_last and last), last_size=last if is_last else None))
            per_round[path.name].append(time.perf_counter() - t0)
            times[path.name] += per_round[path.name][-1]
        log(f'round {r + 1}/{rounds}: {k} step(s) each: reference {per_round["reference"][-1]:.2f}s, fast {per_round["fast"][-1]:.2f}s')
    images = sum(chunks) * bs - (bs - last if steps == 0 and last else 0)
    rss_train = rss_mb()

    if fast.compiled: fast.eval_pass()   # compiles the evaluation, untimed
    results = {}
    for path in (ref, fast):
        t0 = time.perf_counter()
        n = mem.track(path.name, path.eval_pass)
        eval_s = time.perf_counter() - t0
        split = path.split_steps(split_steps)
        train_ips = images / times[path.name]
        eval_ips = n / eval_s
        minutes = RECIPE['epochs'] * (RECIPE['train_images'] / train_ips + RECIPE['test_images'] / eval_ips) / 60
        results[path.name] = dict(
            train_images_per_s=train_ips, train_images=images, train_seconds=times[path.name],
            eval_images_per_s=eval_ips, eval_images=n, eval_seconds=eval_s,
            round_seconds=per_round[path.name],
            split_ms_per_step={p: 1000 * v for p, v in split.items()}, split_steps=split_steps,
            peak_memory_mb=(mem.peak.get(path.name, 0) / 2**20) if gpu else None,
            recipe_minutes=minutes)
    results['reference']['settings'] = dict(data=f'torchvision PIL transforms, DataLoader with {a.workers} workers',
                                            precision='fp32', memory_format='NCHW (contiguous)', optimizer='SGD (torch default)',
                                            compile=False, eval_batch_size=ref.test_loader.batch_size,
                                            eval='student + teacher + SimKD module per batch, as validate_distill')
    results['fast']['settings'] = fast.settings
    memory = dict(kind='cuda_max_allocated_per_path' if gpu else 'cpu_max_rss_process',
                  cpu_max_rss_mb=rss_mb(), cpu_max_rss_after_training_mb=rss_train,
                  cpu_children_max_rss_mb=rss_mb(resource.RUSAGE_CHILDREN))
    ref_r, fast_r = results['reference'], results['fast']
    report = dict(
        benchmark='simkd', device=device.type, device_name=device_name(device), torch=torch.__version__,
        kd_nb=kd_nb.__version__, git_commit=git_commit(ROOT), host=socket.gethostname(), threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(), timestamp=time.strftime('%Y-%m-%dT%H:%M:%S'),
        load_average=dict(before=load_before, after=os.getloadavg()),  # other work on the machine during the run
        config=dict(dataset=dataset, teacher=a.teacher, student=a.student, batch_size=bs, steps=timed, full_epoch=steps == 0, warmup=warmup,
                    fast_knobs={k: v for k, v in knobs.items() if k != 'device'},  # empty: the fast path of a default run
                    rounds=rounds, workers=a.workers, data=data, eval_images=eval_images, lr=lr, recipe=RECIPE,
                    split='extra eager steps, device synchronized after each phase'),
        reference=ref_r, fast=fast_r, memory=memory,
        ratio=dict(train=fast_r['train_images_per_s'] / ref_r['train_images_per_s'],
                   eval=fast_r['eval_images_per_s'] / ref_r['eval_images_per_s'],
                   recipe=ref_r['recipe_minutes'] / fast_r['recipe_minutes'],
                   train_median_of_rounds=statistics.median(a / b for a, b in zip(per_round['reference'], per_round['fast']))))

    out = Path(a.out) if a.out else ROOT / 'benchmarks' / 'results' / f"{device.type}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    with open(out.with_suffix('.csv'), 'w', newline='') as f:
        fields = ['path', 'device', 'device_name', 'teacher', 'student', 'batch_size', 'train_images_per_s', 'eval_images_per_s',
                  'recipe_minutes', 'peak_memory_mb', *(f'split_{p}_ms' for p in PHASES), 'train_ratio', 'eval_ratio', 'recipe_ratio']
        w = csv.DictWriter(f, fieldnames=fields); w.writeheader()
        for name, r in (('reference', ref_r), ('fast', fast_r)):
            w.writerow(dict(path=name, device=device.type, device_name=report['device_name'], teacher=a.teacher, student=a.student,
                            batch_size=bs, train_images_per_s=r['train_images_per_s'], eval_images_per_s=r['eval_images_per_s'],
                            recipe_minutes=r['recipe_minutes'], peak_memory_mb=r['peak_memory_mb'],
                            **{f'split_{p}_ms': r['split_ms_per_step'][p] for p in PHASES},
                            train_ratio=report['ratio']['train'], eval_ratio=report['ratio']['eval'], recipe_ratio=report['ratio']['recipe']))

    print_report(report)
    log(f'written: {out} and {out.with_suffix(".csv")}')
    tmp.cleanup()
    return report


def print_report(r):
    c = r['config']
    print(f"\nSimKD {c['teacher']} -> {c['student']}, batch {c['batch_size']}, {c['steps']} timed steps per path, "
          f"on {r['device']} ({r['device_name']})")
    print(f"{'':28}{'reference':>14}{'fast':>14}{'fast/ref':>10}")
    for key, label, ratio in (('train_images_per_s', 'train images/s', 'train'), ('eval_images_per_s', 'eval images/s', 'eval'),
                              ('recipe_minutes', 'full recipe (minutes)', 'recipe')):
        print(f"{label:28}{r['reference'][key]:14.1f}{r['fast'][key]:14.1f}{r['ratio'][ratio]:9.2f}x")
    print(f"{'train, median of rounds':28}{'':28}{r['ratio']['train_median_of_rounds']:9.2f}x")
    for p in PHASES:
        print(f"{'ms/step ' + p:28}{r['reference']['split_ms_per_step'][p]:14.1f}{r['fast']['split_ms_per_step'][p]:14.1f}")
    if r['device'] == 'cuda':
        print(f"{'peak memory (MB)':28}{r['reference']['peak_memory_mb']:14.0f}{r['fast']['peak_memory_mb']:14.0f}")
    else:
        m = r['memory']
        print(f"peak RSS of the process: {m['cpu_max_rss_mb']:.0f} MB (both paths; DataLoader workers: {m['cpu_children_max_rss_mb']:.0f} MB)")
    print(f"fast path: {r['fast']['settings']}")
    print(f"load average (1, 5, 15 min) before / after: {r['load_average']['before']} / {r['load_average']['after']}")


if __name__ == '__main__':
    main()
