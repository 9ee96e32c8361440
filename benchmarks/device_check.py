"""Everything a short GPU window should measure, in one call: the reference loop against the fast path in each step mode,
the accuracy of the fastest mode against the committed CPU runs, and how many runs one GPU holds.

    python benchmarks/device_check.py --out OUT                        # speed: about 5 minutes on one H100/H200
    python benchmarks/device_check.py --out OUT --accuracy             # and the accuracy check: about 3 more
    python benchmarks/device_check.py --out OUT --modes '' --concurrency 1,4,8,16   # runs per GPU alone: about 6
    python benchmarks/device_check.py --out /tmp/check --smoke --accuracy --concurrency 1,2   # every part on the CPU

It prints its time plan (estimates for one H100/H200) before it starts.

1. speed: `bench_simkd.py` (one full epoch of the reference loop and of the fast path each) with the fast path's steps
   eager, compiled (`compile on`) and compiled with CUDA graphs (`compile_mode reduce-overhead`); `bench-<mode>.json`
   and `.csv` each, the ratios and the projected full recipe (240 epochs) printed and in `device_check.json`;
2. `--accuracy`: `sweeps/cifar10_gpu_fast.yaml` (SimKD (L2) resnet20 -> resnet8, 8 epochs, seeds 0 and 1, bf16 with
   CUDA graphs) into `OUT/runs/`, both runs on the one GPU, their top-1 against the committed CPU runs
   `results/cifar10-jpeg-converged/budget/simkd-resnet20-resnet8-epochs_8-s{0,1}`;
3. `--concurrency 1,4,8,16`: that run (2 epochs, the first `--concurrency-images` training images) started N times at
   once by `kd-sweep run --workers N`: the aggregate training images/s of the second epochs and each run's peak memory.

The data: the JPEG CIFAR-10 copy in `--data-dir` (imported there first from `--import-from` when missing), else, for the
speed part only, synthetic CIFAR-100-shaped images. Everything is written under `--out` (on the device machine: $OUT).
"""
import argparse, csv, json, sys, tempfile, time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_simkd                                          # the benchmark itself: imported, not repeated here
from kd_nb.data import data_source, import_cifar, make_synthetic_cifar
from kd_nb.experiment import project_root
from kd_nb.hardware import device_name
from kd_nb.runs import RunFolder, read_json
from kd_nb.sweep import load_sweep, run_sweep

ROOT = project_root(Path(__file__).parent)
MODES = {'eager': ['--compile', 'off'], 'compiled': ['--compile', 'on'],
         'cuda_graphs': ['--compile', 'on', '--compile-mode', 'reduce-overhead']}
GPU_FAST = ROOT / 'sweeps' / 'cifar10_gpu_fast.yaml'
CPU_RUNS = 'results/cifar10-jpeg-converged/budget/simkd-resnet20-resnet8-epochs_8-s{seed}'
SECONDS = dict(import_data=30, eager=45, compiled=150, cuda_graphs=90,   # planning estimates on one H100/H200: a mode's epochs,
               accuracy=180, concurrency_per_n=45)                      # evaluations and compilation (cached after the first)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', required=True, help='folder for every result (on the device machine: $OUT)')
    p.add_argument('--data-dir', default='data', help='where the CIFAR-10 copy is, or is imported to (default: data)')
    p.add_argument('--import-from', default='../shared/data/cifar10-jpeg.tar.gz',
                   help='the JPEG archive imported into --data-dir when the copy is missing')
    p.add_argument('--modes', default=','.join(MODES), help=f"step modes of the speed part (default: {','.join(MODES)}; '' skips it)")
    p.add_argument('--accuracy', action='store_true', help='train sweeps/cifar10_gpu_fast.yaml and compare with the CPU runs')
    p.add_argument('--concurrency', default='', help='numbers of runs at once on the GPU, e.g. 1,4,8,16')
    p.add_argument('--concurrency-images', type=int, default=20_000, help='training images per epoch of each concurrent run')
    p.add_argument('--smoke', action='store_true', help='every part in a few steps on the CPU, on synthetic CIFAR-10')
    return p.parse_args(argv)


def plan(a, modes, ns, have_data) -> float:
    "Print the time budget of this call; return the estimated seconds."
    rows = []
    if not have_data and Path(a.import_from).is_file(): rows.append(('import the JPEG CIFAR-10 copy', SECONDS['import_data']))
    rows += [(f'speed, fast path {m} (one epoch each path, compilation untimed)', SECONDS[m]) for m in modes]
    if a.accuracy: rows.append(('accuracy: 2 runs of 8 epochs, together', SECONDS['accuracy']))
    rows += [(f'concurrency: {n} run(s) at once, 2 epochs of {a.concurrency_images} images', SECONDS['concurrency_per_n'] * (1 + n / 8))
             for n in ns]
    total = sum(s for _, s in rows)
    print(f"plan{' (smoke: a few steps each, on the CPU)' if a.smoke else ''}:", flush=True)
    for what, s in rows: print(f"  {s / 60:5.1f} min  {what}")
    print(f"  {total / 60:5.1f} min  in all (estimates for one H100/H200)\n", flush=True)
    return total


def speed(a, modes, data_dir, out: Path) -> dict:
    "bench_simkd in each step mode; its reports by mode."
    if a.smoke: args = ['--device', 'cpu', '--steps', '2', '--batch-size', '16', '--teacher', 'resnet8', '--student', 'resnet8',
                        '--warmup', '1', '--workers', '0', '--eval-images', '64', '--split-steps', '1']
    else: args = ['--steps', '0']    # one full epoch each path, the paper's resnet32x4 -> resnet8x4
    if data_dir: args += ['--dataset', 'cifar10', '--data-dir', str(data_dir)]
    reports = {}
    for m in modes:
        print(f"== speed: fast path {m} ==", flush=True)
        reports[m] = bench_simkd.main(args + MODES[m] + ['--out', str(out / f'bench-{m}.json')])
        reports[m]['cudagraph_counters'] = cudagraph_counters()
    print(f"\n{'fast path':14}{'reference img/s':>17}{'fast img/s':>12}{'train x':>9}{'eval x':>8}{'recipe min':>12}{'ref recipe min':>16}")
    for m, r in reports.items():
        print(f"{m:14}{r['reference']['train_images_per_s']:17.0f}{r['fast']['train_images_per_s']:12.0f}{r['ratio']['train']:8.2f}x"
              f"{r['ratio']['eval']:7.2f}x{r['fast']['recipe_minutes']:12.1f}{r['reference']['recipe_minutes']:16.1f}")
    return {m: dict(train_ratio=r['ratio']['train'], eval_ratio=r['ratio']['eval'], recipe_ratio=r['ratio']['recipe'],
                    fast_train_images_per_s=r['fast']['train_images_per_s'], reference_train_images_per_s=r['reference']['train_images_per_s'],
                    fast_recipe_minutes=r['fast']['recipe_minutes'], reference_recipe_minutes=r['reference']['recipe_minutes'],
                    fast_settings=r['fast']['settings'], cudagraph_counters=r['cudagraph_counters'], file=f'bench-{m}.json')
            for m, r in reports.items()}


def graph_rng(device) -> dict:
    "Whether random numbers drawn inside a step that replays as CUDA graphs differ between replays (CRD draws its negatives so)."
    step = torch.compile(lambda x: x + torch.randint(0, 1 << 20, x.shape, device=x.device), mode='reduce-overhead')
    x, draws = torch.zeros(8, device=device), []
    for _ in range(4):
        torch.compiler.cudagraph_mark_step_begin()
        draws.append(step(x).clone())
    fresh = all(not torch.equal(draws[i], draws[i + 1]) for i in range(len(draws) - 1))
    print(f"random numbers inside a replayed step: {'new at every replay' if fresh else 'REPEATED between replays'}", flush=True)
    return dict(new_draws_every_replay=fresh)


def cudagraph_counters() -> dict:
    "Inductor's counts about CUDA graphs so far in this process (skips name why a graph was not used)."
    from torch._dynamo.utils import counters
    return {k: v for k, v in counters['inductor'].items() if 'cudagraph' in k}


def overrides(a, data_dir, **more) -> dict:
    "The knobs forced on the sweeps of this check: the data, and in a smoke run the CPU and a few images."
    o = {'data_dir': str(data_dir)}
    if a.smoke: o.update(device='cpu', compile='off', epochs=1, lr_milestones='', train_limit=128, test_limit=64, eval_batch_size=64)
    return {**o, **more}


def accuracy(a, data_dir, out: Path) -> dict:
    "Train sweeps/cifar10_gpu_fast.yaml into OUT/runs and set its runs' top-1 beside the committed CPU runs'."
    print("== accuracy: sweeps/cifar10_gpu_fast.yaml ==", flush=True)
    t0 = time.perf_counter()
    res = run_sweep(load_sweep(GPU_FAST, overrides(a, data_dir)), out / 'runs', workers=2)
    rows = []
    for name in res.planned:
        folder = RunFolder(out / 'runs' / 'gpu-fast' / name)
        s, seed = folder.summary, folder.params.get('seed')
        cpu = read_json(ROOT / CPU_RUNS.format(seed=seed) / 'summary.json') or {}
        rows.append(dict(run=name, seed=seed, status=s.get('status'), step_mode=folder.params.get('step_mode'),
                         drop_last=folder.params.get('drop_last'), precision=folder.config.get('precision'),
                         best_test_acc=s.get('best_test_acc'), final_test_acc=s.get('final_test_acc'),
                         cpu_best_test_acc=cpu.get('best_test_acc'), images_per_s=s.get('images_per_s'),
                         peak_memory_mb=s.get('peak_memory_mb'), wall_time_s=s.get('wall_time_s')))
    print(f"{'run':28}{'mode':>13}{'top-1':>8}{'CPU top-1':>11}{'img/s':>9}{'peak MB':>9}")
    for r in rows:
        print(f"{r['run']:28}{str(r['step_mode']):>13}{r['best_test_acc'] or float('nan'):8.2f}{r['cpu_best_test_acc'] or float('nan'):11.2f}"
              f"{r['images_per_s'] or float('nan'):9.0f}{r['peak_memory_mb'] or float('nan'):9.0f}")
    return dict(sweep=str(GPU_FAST.relative_to(ROOT)), seconds=time.perf_counter() - t0, runs=rows)


def concurrency_sweep(a, n: int, folder: Path) -> Path:
    "A sweep file of `n` copies (seeds 0..n-1) of the gpu-fast run, 2 epochs of `--concurrency-images` images each."
    base = {**yaml.safe_load(GPU_FAST.read_text())['base'], 'epochs': 2, 'lr_milestones': '', 'train_limit': a.concurrency_images}
    path = folder / f'concurrency-{n}.yaml'
    path.write_text(yaml.safe_dump(dict(name=f'concurrency-{n}', base=base, seeds=list(range(n)))))
    return path


def concurrency(a, ns, data_dir, out: Path) -> dict:
    "For each N: N runs at once (kd-sweep run --workers N): the aggregate training images/s of their second epochs, and each run's peak memory."
    rows = []
    for n in ns:
        print(f"== concurrency: {n} run(s) at once ==", flush=True)
        t0 = time.perf_counter()
        res = run_sweep(load_sweep(concurrency_sweep(a, n, out), overrides(a, data_dir, **({'train_limit': 128} if a.smoke else {}))),
                        out / 'runs', workers=n)
        wall = time.perf_counter() - t0
        runs = [RunFolder(out / 'runs' / f'concurrency-{n}' / name) for name in res.planned]
        ips = [last_epoch_images_per_s(r.path) for r in runs]
        rows.append(dict(runs=n, done=sum(r.summary.get('status') == 'done' for r in runs), wall_seconds=wall,
                         aggregate_images_per_s=sum(i for i in ips if i), per_run_images_per_s=ips,
                         peak_memory_mb=[r.summary.get('peak_memory_mb') for r in runs],
                         step_mode=sorted({str(r.params.get('step_mode')) for r in runs})))
        print(f"{n} run(s): {rows[-1]['aggregate_images_per_s']:.0f} images/s in all, peak memory per run "
              f"{max([m for m in rows[-1]['peak_memory_mb'] if m] or [0]):.0f} MB, {wall:.0f}s", flush=True)
    return dict(images_per_run_epoch=a.concurrency_images, rows=rows)


def last_epoch_images_per_s(run_dir: Path):
    "Training images/s of the last epoch in a run's metrics.csv (the first epoch includes compilation)."
    path = run_dir / 'metrics.csv'
    if not path.is_file(): return None
    rows = list(csv.DictReader(path.open()))
    return float(rows[-1]['images_per_s']) if rows else None


def main(argv=None) -> dict:
    a = parse_args(argv)
    out = Path(a.out).resolve(); out.mkdir(parents=True, exist_ok=True)
    modes = [m for m in a.modes.split(',') if m]
    bad = [m for m in modes if m not in MODES]
    if bad: raise SystemExit(f"--modes: unknown {bad}; valid: {', '.join(MODES)}")
    try: ns = [int(n) for n in a.concurrency.split(',') if n.strip()]
    except ValueError: raise SystemExit(f"--concurrency: expected numbers of runs like 1,4,8,16, got {a.concurrency!r}") from None
    if any(n < 1 for n in ns): raise SystemExit(f"--concurrency: numbers of runs must be >= 1, got {a.concurrency!r}")
    if a.smoke: ns = [min(n, 2) for n in ns]
    if not a.smoke and not torch.cuda.is_available(): raise SystemExit('no CUDA device here; --smoke runs every part on the CPU')
    t_start = time.perf_counter()

    tmp = tempfile.TemporaryDirectory()
    data_dir = Path(a.data_dir)
    if a.smoke: data_dir = make_synthetic_cifar(Path(tmp.name) / 'data', 'cifar10', n_train=256, n_test=128, seed=0)
    have_data = (data_dir / 'cifar-10-batches-py').is_dir()
    estimate = plan(a, modes, ns, have_data)
    if not have_data and Path(a.import_from).is_file():
        print(f"importing {a.import_from} into {data_dir}", flush=True)
        import_cifar(a.import_from, 'cifar10', data_dir, progress=False)
        have_data = True
    if not have_data and (a.accuracy or ns):
        raise SystemExit(f"--data-dir: no CIFAR-10 copy in {data_dir} and no archive at {a.import_from}: the accuracy and concurrency "
                         f"parts train on it (kd-data import ../shared/data/cifar10-jpeg.tar.gz --dataset cifar10 --data-dir data)")
    device = torch.device('cuda' if torch.cuda.is_available() and not a.smoke else 'cpu')
    report = dict(check='device', device=device.type, device_name=device_name(device), torch=torch.__version__,
                  timestamp=time.strftime('%Y-%m-%dT%H:%M:%S'), smoke=a.smoke, estimate_seconds=estimate,
                  data=data_source('cifar10', data_dir) if have_data else 'synthetic CIFAR-100-shaped')
    save = lambda: (out / 'device_check.json').write_text(json.dumps(report, indent=2, default=str))
    report['graph_rng'] = graph_rng(device); save()
    if modes:
        report['speed'] = speed(a, modes, data_dir if have_data else None, out); save()
    if a.accuracy:
        report['accuracy'] = accuracy(a, data_dir, out); save()
    if ns:
        report['concurrency'] = concurrency(a, ns, data_dir, out); save()
    report['seconds'] = time.perf_counter() - t_start; save()
    if 'speed' in report:
        best = min(report['speed'].items(), key=lambda kv: kv[1]['fast_recipe_minutes'])
        print(f"\nfull recipe (240 epochs of 50,000 + 10,000 images) projected: {best[1]['fast_recipe_minutes']:.1f} min "
              f"with the fast path {best[0]}, {best[1]['reference_recipe_minutes']:.1f} min by the reference loop "
              f"({best[1]['recipe_ratio']:.2f}x)")
    print(f"written: {out / 'device_check.json'} ({report['seconds']:.0f}s; planned {estimate:.0f}s)")
    tmp.cleanup()
    return report


if __name__ == '__main__':
    main()
