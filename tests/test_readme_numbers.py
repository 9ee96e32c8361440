"""Every number the README states about a measurement is read back from the committed files it comes from.

The results tables between `<!-- table: ... -->` markers are written by `.ci/readme.py` (tests/test_docs.py); the
tests here check the rest: the sweep run counts, the benchmark tables, the synthetic-data accuracies and every
accuracy and interval quoted in the reading of the study on real pixels."""
import itertools
import json
import re
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / 'README.md').read_text()
STUDY = ROOT / 'results' / 'cifar10-jpeg-cpu'
NUMBER = r'[+\-−]?\d+(?:\.\d+)?'


def section(start: str, end: str) -> str:
    "The README's text from the line holding `start` up to the next line holding `end`."
    i = README.index(start)
    return README[i:README.index(end, i + len(start))]


def table_rows(start: str) -> list[list[str]]:
    "The cells of each row of the Markdown table whose header line starts with `start`."
    lines = README[README.index(start):].splitlines()[2:]   # below the header and its separator
    rows = itertools.takewhile(lambda l: l.startswith('|'), lines)
    return [[c.strip() for c in r.strip('|').split('|')] for r in rows]


def num(text: str) -> float: return float(text.replace('−', '-'))


def test_sweep_run_counts():
    "The `runs` column of the sweeps table is what each file expands to."
    from kd_nb.sweep import expand, load_sweep
    count = lambda name: len(expand(load_sweep(ROOT / 'sweeps' / name)))
    rows = table_rows('| sweep file |')
    files = [r[0].strip('`') for r in rows if r[0] != '`*_quick.yaml`']
    assert len(rows) >= 9
    for r in rows:
        if r[0] == '`*_quick.yaml`':
            full = [f for f in files if (ROOT / 'sweeps' / f.replace('.yaml', '_quick.yaml')).exists()]
            assert [int(x) for x in r[2].split(', ')] == [count(f.replace('.yaml', '_quick.yaml')) for f in full]
        else:
            assert int(r[2]) == count(r[0].strip('`')), r[0]


def benchmark_figures(path) -> tuple:
    "The four cells of a row of a speed table, as `benchmarks/bench_simkd.py` measured them into `path` (recipe: hours on a CPU, minutes on a GPU)."
    b = json.loads(path.read_text())
    r, on_cpu = b['ratio'], b['device'] == 'cpu'
    recipe = lambda side: b[side]['recipe_minutes'] / (60 if on_cpu else 1)
    unit = 'h' if on_cpu else 'min'
    return (b['device_name'], f"{r['train']:.2f}x ({r['train_median_of_rounds']:.2f}x)", f"{r['eval']:.1f}x",
            f"{recipe('reference'):.1f} {unit} → {recipe('fast'):.1f} {unit}")


def test_cpu_speed_table_is_the_benchmark_results():
    "Each row of the CPU speed table is one committed benchmark result, and the sentence below it quotes their medians."
    measured = [benchmark_figures(p) for p in sorted((ROOT / 'benchmarks' / 'results').glob('cpu-*.json'))]
    rows = table_rows('| CPU (2 cores) | fast path |')
    assert len(rows) >= 4
    for cpu, _, train, evaluation, recipe in rows:
        assert any(d in cpu and (train, evaluation, recipe) == tuple(m) for d, *m in measured), (cpu, train, evaluation, recipe)
    medians = {re.search(r'\((\d\.\d\dx)\)', r[2])[1] for r in rows}
    quoted = re.findall(r'\d\.\d\dx', section('The CPU target is met', '\n\n'))
    assert quoted and set(quoted) <= medians


def test_gpu_speed_table_is_the_benchmark_results():
    "Each row of the GPU speed table is one committed GPU benchmark result; the sentence below quotes its figures."
    measured = {p.name: benchmark_figures(p) for p in sorted((ROOT / 'benchmarks' / 'results').glob('cuda-*.json'))}
    rows = table_rows('| GPU | fast path |')
    assert rows and measured
    for gpu, _, train, evaluation, recipe in rows:
        assert any(d in gpu and (train, evaluation, recipe) == tuple(m) for d, *m in measured.values()), (gpu, train, evaluation, recipe)
    text = section('The GPU targets are', '\n\n')
    figures = {x for _, t, _, r in measured.values() for x in (t.split(' ')[0], r.split(' → ')[1].split(' ')[0])}
    quoted = re.findall(r'\d\.\d\dx', text) + re.findall(r'(\d+\.\d) minutes', text)
    assert quoted and set(quoted) <= figures, quoted
    b = [json.loads(p.read_text()) for p in sorted((ROOT / 'benchmarks' / 'results').glob('cuda-*.json'))]
    split = {f"{v:.1f}" for r in b for side in ('reference', 'fast') for v in r[side]['split_ms_per_step'].values()}
    quoted = re.findall(r'(\d+\.\d)(?= ms| and \d+\.\d ms)', text)
    assert len(quoted) == 6 and set(quoted) <= split, quoted


def test_device_check_quotes_both_runs():
    "The GPU and CPU accuracies of SimKD seed 0 quoted in the precision paragraph are those of the two committed runs."
    gpu = ROOT / 'results' / 'cifar10-jpeg-device-check' / 'gpu-check' / 'simkd-resnet20-resnet8-s0'
    cpu = ROOT / 'results' / 'cifar10-jpeg-converged' / 'budget' / 'simkd-resnet20-resnet8-epochs_8-s0'
    if not (gpu.is_dir() and cpu.is_dir()): pytest.skip('the device check runs are not in this checkout')
    cfg = json.loads((gpu / 'config.json').read_text())
    assert cfg['device'] == 'cuda' and cfg['precision'] == 'fp32'
    best = lambda run: json.loads((run / 'summary.json').read_text())['best_test_acc']
    text = ' '.join(section('Whether the', '\n\n').split())
    assert f"**{best(gpu):.2f}%** on the GPU against **{best(cpu):.2f}%** on the CPU" in text
    seeds = [cpu, cpu.with_name('simkd-resnet20-resnet8-epochs_8-s1'), cpu.parents[1] / 'converged' / 'simkd-resnet20-resnet8-s2']
    spread = statistics.stdev(best(d) for d in seeds)
    assert f"inside the {spread:.2f}-point spread of SimKD's three seeds" in text


@pytest.mark.skipif(not (STUDY / 'fast_path_quick').is_dir(), reason='the fast-path runs are not in this checkout')
def test_fast_path_accuracy_table_is_its_runs():
    "Top-1, the per-seed difference and the images/s of the fast-path comparison are what its runs recorded."
    from kd_nb.run_table import load_runs
    from kd_nb.tables import speed_table
    t = speed_table(load_runs(STUDY / 'fast_path_quick'))
    rows = table_rows('| resnet20 → resnet8, 12 epochs of 5,000 images')
    assert len(rows) == len(t) == 3
    for (_, top1, diff, speed), (_, r) in zip(rows, t.iterrows()):
        assert top1 == r['mean ± std'].split(' (')[0] and diff.replace('−', '-') == r['Δ per seed'].split(' (')[0]
        images = speed.split(' ')[0]
        assert int(images) == round(r['images/s'])
        if '(' in speed: assert speed.split('(')[1] == f"{r['images/s'] / t['images/s'][0]:.1f}x)"


@pytest.mark.skipif(not (ROOT / 'results' / 'synthetic' / 'synthetic_quick').is_dir(), reason='the synthetic quick runs are not in this checkout')
def test_synthetic_quick_accuracies():
    "The teacher and SimKD accuracies the README gives for the `quick` preset on synthetic CIFAR-100 are the committed runs'."
    from kd_nb.run_table import load_runs
    runs = load_runs(ROOT / 'results' / 'synthetic' / 'synthetic_quick')
    simkd = runs[runs.method == 'simkd'].iloc[0]
    text = section('The synthetic data is sized', '\n\n')
    assert f"teacher reaches {round(simkd.teacher_test_acc)}%" in text and f"SimKD resnet8 {round(simkd.best_test_acc)}%" in text


def assert_quotes_hold(text: str, runs):
    "Every mean (`x.x%`), paired difference with its interval (`+d.d [lo, hi]`) and distance quoted in `text` is one `runs` give."
    from kd_nb.stats import study_stats
    labels = sorted(set(study_stats(runs, baselines=()).label))
    stats = study_stats(runs, baselines=labels)
    means = {f'{m:.{digits}f}' for m in stats['mean'] for digits in (1, 2)}
    diffs = {tuple(f"{d[k]:+.{digits}f}" for k in ('mean', 'lo', 'hi')) for b in labels for d in stats[f'vs {b}'] if d['n'] > 1
             for digits in (1, 2)}
    gaps = {d[0].lstrip('+-') for d in diffs}   # paired differences, quoted as distances
    quoted = list(re.finditer(rf'\(?({NUMBER})(?: points)? \(?\[({NUMBER}), ({NUMBER})\]', text))
    for m in quoted:
        digits = len(m[1].split('.')[1]) if '.' in m[1] else 0
        assert tuple(f'{num(x):+.{digits}f}' for x in m.groups()) in diffs, m[0]
    for m in re.finditer(r'(\d+\.\d+)%', text): assert m[1] in means, m[0]
    ends = {x for d in diffs for x in d}
    for m in re.finditer(r'(?<![\d.])([+\-−]\d+\.\d+)(?![\d%])', text): assert f'{num(m[1]):+.{len(m[1].split(".")[1])}f}' in ends, m[0]
    for m in re.finditer(r'by (\d+\.\d+) (?:and|to) (\d+\.\d+) points', text): assert {m[1], m[2]} <= gaps, m[0]
    return len(quoted)


@pytest.mark.skipif(not (STUDY / 'cifar10_cpu').is_dir(), reason='the study on real pixels is not in this checkout')
def test_reading_quotes_the_committed_runs():
    "Every accuracy, difference and interval quoted in the reading of the 50,000-image study is computed from its runs."
    from kd_nb.run_table import load_runs, load_metrics
    from kd_nb.stats import study_stats
    runs = load_runs(STUDY / 'cifar10_cpu')
    curves = load_metrics(STUDY / 'cifar10_cpu')
    simkd_s0 = [f'{a:.0f}' for a in curves[curves.run == 'simkd-resnet14x2-resnet8-s0'].sort_values('epoch').test_acc1]
    text = section('- **Beyond seed noise**', 'Five student epochs')
    assert_quotes_hold(text, runs)
    assert re.search(r'\(((?:\d+, )+\d+)% for seed 0\)', text)[1].split(', ') == simkd_s0
    teacher = runs.teacher_test_acc.dropna().iloc[0]
    assert f'**{teacher:.2f}% top-1**' in section('### Early training', '| setting |')


STUDY_TEACHERS = {   # each study's one committed teacher, and the README section that gives its accuracy and sha256
    'results/cifar10-jpeg-converged/teacher/scratch-resnet20-s0': ('### The converged study', '### The second pair'),
    'results/cifar10-jpeg-pair2/teacher/scratch-resnet8x4-s0': ('### The second pair', '### Early training'),
}


@pytest.mark.parametrize('folder', STUDY_TEACHERS)
def test_study_teacher_is_the_committed_one(folder):
    "The teacher accuracy and the sha256 the README gives are those of the committed teacher run and its best.pt."
    import hashlib, subprocess
    if not (ROOT / folder / 'best.pt').is_file(): pytest.skip(f'{folder} has no best.pt in this checkout')
    from kd_nb.runs import RunFolder
    s = RunFolder(ROOT / folder).summary
    text = section(*STUDY_TEACHERS[folder])
    assert s['status'] == 'done' and f"**{s['best_test_acc']:.2f}% top-1**" in text and f"{s['final_test_acc']:.2f}% at the last" in text
    digest = hashlib.sha256((ROOT / folder / 'best.pt').read_bytes()).hexdigest()
    assert f"sha256 `{digest}`" in text and s['best_sha256'] == digest
    tracked = subprocess.run(['git', 'ls-files', '--error-unmatch', f'{folder}/best.pt'], cwd=ROOT, capture_output=True)
    assert tracked.returncode == 0, f'{folder}/best.pt is not committed'


def test_second_teacher_against_the_first():
    "The second pair's teacher section: its size, its size over resnet20's, its lead over resnet20, its minutes and its speed, from the two teacher runs."
    from kd_nb.runs import RunFolder
    (_, first), (second_folder, second) = ((f, RunFolder(ROOT / f).summary) for f in STUDY_TEACHERS)
    text = ' '.join(section(*STUDY_TEACHERS[second_folder]).split())
    assert f"resnet8x4 ({second['deploy_params'] / 1e6:.2f}M parameters, {second['deploy_params'] / first['deploy_params']:.1f} times resnet20's)" in text
    assert f"{second['best_test_acc'] - first['best_test_acc']:.2f} points above resnet20" in text
    assert f"It took {second['wall_time_s'] / 60:.0f} minutes on the 2 CPU cores ({second['images_per_s']:.0f} images/s)" in text


@pytest.mark.skipif(not (STUDY / 'cifar10_cpu').is_dir(), reason='the study on real pixels is not in this checkout')
def test_study_time_is_the_runs_time():
    "The teacher's minutes, the students' range of minutes and the hours of the two-at-a-time study are those the runs recorded."
    import pandas as pd
    from kd_nb.run_table import load_runs
    runs = load_runs(STUDY / 'cifar10_cpu')
    teacher = STUDY / 'teachers' / Path(runs.teacher_source.dropna().iloc[0]).parent.name
    teacher_min = pd.read_csv(teacher / 'metrics.csv').epoch_time_s.sum() / 60
    minutes = sorted(runs.wall_time_s / 60)
    students = minutes[:-1]                  # the first run to need the teacher trained it: its time holds the teacher's
    assert minutes[-1] > teacher_min > students[-1]
    hours = (teacher_min + sum(students) / 2) / 60
    text = section('The whole study took', 'Train it again')
    assert "about 2¼ hours" in text and abs(hours - 2.25) < 0.125
    assert f"the teacher {teacher_min:.0f}\nminutes" in text or f"the teacher {teacher_min:.0f} minutes" in text
    assert f"{len(students)} student runs of {students[0]:.0f} to {students[-1]:.0f} minutes" in text


CONVERGED = ROOT / 'results' / 'cifar10-jpeg-converged'


@pytest.mark.skipif(not (CONVERGED / 'converged').is_dir(), reason='the converged study is not in this checkout')
def test_converged_reading_quotes_the_committed_runs():
    "Every accuracy, difference and interval quoted in the reading of the study at B is computed from its runs at B."
    from kd_nb.run_table import load_runs
    from kd_nb.stats import study_stats
    runs = load_runs(CONVERGED)
    at_b = runs[runs.epochs == 8]
    text = section('What the study at B says (', '```bash')
    assert assert_quotes_hold(text, at_b) >= 4
    early = study_stats(runs[runs.epochs == 1], baselines=('simkd',)).set_index('label')
    assert f"led by {early.loc['simkd loss=cosine', 'vs simkd']['mean']:.0f} points" in text


DEPLOY_NAMES = {'scratch': 'scratch', 'KD': 'kd', 'SimKD-L2': 'simkd', 'SimKD-smooth L1': 'simkd loss=smooth_l1'}


def test_deploy_retrains_quote_their_runs():
    "Each fp32 retrain the deployment study quotes per seed, the committed run it repeats, and the largest gap between them are read back from the run folders."
    from kd_nb.run_table import load_runs
    text = section('### The deployment study', '<!-- deploy:')
    per_seed = re.findall(r'on seed (\d+), (.*?)(?=; on seed|\. )', text, re.S)
    assert [int(seed) for seed, _ in per_seed] == [0, 1], per_seed
    retrains = load_runs(CONVERGED / 'deploy')
    everything = load_runs(CONVERGED)
    committed = everything[~everything.run.str.startswith('deploy/')]
    top1 = lambda runs, label, seed: runs[(runs.label == DEPLOY_NAMES[label]) & (runs.seed == seed) & (runs.epochs == 8)].best_test_acc
    gaps = []
    for seed, quotes in per_seed:
        quoted = re.findall(r'(' + '|'.join(DEPLOY_NAMES) + r')\s+(\d+\.\d\d)\s+\(committed\s+(\d+\.\d\d)\)', quotes)
        assert {name for name, *_ in quoted} == set(DEPLOY_NAMES), (seed, quoted)
        for name, again, before in quoted:
            assert list(top1(retrains, name, int(seed))) == [float(again)], (seed, name)
            assert float(before) in set(top1(committed, name, int(seed))), (seed, name)
            gaps.append(abs(float(again) - float(before)))
    assert f'within about {max(gaps):.1f} points' in text


PAIR2 = ROOT / 'results' / 'cifar10-jpeg-pair2'


needs_pair2 = pytest.mark.skipif(not (PAIR2 / 'pair2').is_dir(), reason="the second pair's study is not in this checkout")
DKD = 'kd loss=dkd ce_weight=1.0'
KD_LS = 'kd loss_weight=9 loss_options={"kl": {"T": 2, "standardize": true}}'
CRD = 'kd loss=crd ce_weight=1.0 layers=4 projector=none'
CRD_KD = 'kd loss=crd,kl loss_weight=0.8,1 ce_weight=1.0 layers=4 projector=none'
L1, COSINE = 'simkd loss=l1', 'simkd loss=cosine'
TOP = ['simkd loss=smooth_l1', 'simkd loss_weight=25', 'simkd loss_weight=50']   # the losses that pull hardest


@pytest.fixture(scope='module')
def pair2():
    "The second pair's runs at B, their top-1 by seed and label (DKD and CRD run as method kd too), its per-epoch metrics indexed by run, and the README's reading of them, raw and on one line."
    from kd_nb.run_table import load_runs, load_metrics
    runs = load_runs(PAIR2)
    at_b = runs[runs.epochs == 8]
    raw = section('So far, on 2 seeds each', '### Early training')
    acc = at_b.pivot(index='seed', columns='label', values='best_test_acc')
    return SimpleNamespace(runs=at_b, acc=acc, metrics=load_metrics(PAIR2).set_index('run'), raw=raw, text=' '.join(raw.split()))


def wins(acc, better, worse):
    "Whether `better` is ahead of `worse`, on each seed both labels have."
    both = acc[[better, worse]].dropna()
    return both[better] > both[worse]


def ahead(acc, better, worse):
    "The seeds both labels have, as the reading counts them, and whether `better` is ahead on every one."
    w = wins(acc, better, worse)
    return 'both seeds' if len(w) == 2 else f'all {len(w)} seeds', w.all()


def spread(acc, label):
    "The distance between the best and the worst seed of `label`, as the reading quotes it."
    return f'{acc[label].max() - acc[label].min():.2f} points apart'


@needs_pair2
def test_second_pair_reading_quotes_its_runs(pair2):
    "Every accuracy, difference and interval quoted in the reading of the second pair's study is computed from its runs."
    assert assert_quotes_hold(pair2.raw, pair2.runs) >= 2


@needs_pair2
def test_second_pair_seed_counts_hold(pair2):
    "Every 'on both seeds' or 'on all n seeds' the reading says of KD, SimKD, middle, smooth L1, L2 at weight 25, DKD, KD with logit standardization, CRD, CRD with KD, L1, cosine and factor 4 holds seed by seed, as do the spreads it quotes."
    acc, text = pair2.acc, pair2.text
    for phrase, better, worse in [('KD leads scratch on', 'kd', 'scratch'), ('and so does SimKD (L2 at weight 1), on', 'simkd', 'scratch'),
                                  ('KD leads SimKD here, on', 'kd', 'simkd'), ('ahead of down on', 'simkd direction=middle', 'simkd direction=down'),
                                  ('behind it on', 'simkd loss_weight=50', 'simkd loss=smooth_l1'),   # smooth L1 behind L2 at weight 50
                                  ('ahead of smooth L1 on', 'simkd loss_weight=25', 'simkd loss=smooth_l1'),   # L2 at its scale
                                  ('which is ahead of it on', 'kd', DKD), ('leads DKD on', 'simkd loss_weight=50', DKD),
                                  ('KD is ahead of it on', 'kd', KD_LS), ('CRD is ahead of scratch on', CRD, 'scratch'),
                                  ('L2 at weight 50 leads CRD on', 'simkd loss_weight=50', CRD),
                                  ('CRD with KD is ahead of SimKD at weight 1 on', CRD_KD, 'simkd'), ('L2 at weight 50 leads CRD with KD on', 'simkd loss_weight=50', CRD_KD),
                                  ('Cosine leads SimKD at weight 1 on', COSINE, 'simkd'), ('and leads KD on', COSINE, 'kd'), ('and ahead of L1 on', COSINE, L1),
                                  ('behind factor 2 on', 'simkd', 'simkd factor=4'), ('is ahead of factor 4 on', 'simkd direction=middle', 'simkd factor=4')] + \
                                 [('KD with logit standardization and SimKD at weight 1 on', b, CRD) for b in ('kd', DKD, KD_LS, 'simkd')]:
        seeds, holds = ahead(acc, better, worse)
        assert f'{phrase} {seeds}' in text and holds, (phrase, better, worse, seeds)
    assert f'its two seeds {spread(acc, CRD)}' in text and f'its third seed lies between its first two, {spread(acc, CRD_KD)}' in text
    assert acc[CRD_KD].min() < acc[CRD_KD][2] < acc[CRD_KD].max()
    level = re.search(r'It is level with KD, \S+ \[\S+, \S+\], ahead on (\d) seeds of (\d)', text)
    crd_kd_over_kd = wins(acc, CRD_KD, 'kd')
    assert level and (int(level[1]), int(level[2])) == (crd_kd_over_kd.sum(), len(crd_kd_over_kd))
    assert "SimKD's best weight here leads every published method on every seed" in text
    assert all(wins(acc, 'simkd loss_weight=50', published).all() for published in (DKD, KD_LS, CRD, CRD_KD))


@needs_pair2
def test_second_pair_losses_keep_their_order(pair2):
    "L1 and cosine trail every loss that pulls hardest and lead L2 at weight 1 on each of their seeds, as the reading says."
    acc, text = pair2.acc, pair2.text
    assert f'reaches {acc[L1].mean():.2f}%, its two seeds {spread(acc, L1)}' in text
    assert f'reaches {acc[COSINE].mean():.2f}%' in text
    for label, opening in ((L1, 'L1 is behind'), (COSINE, 'It is behind')):
        seeds, _ = ahead(acc, TOP[0], label)
        assert f'{opening} smooth L1 at weight 50 and L2 at weights 25 and 50 on {seeds}' in text
        assert all(wins(acc, b, label).all() for b in TOP)
    assert 'and ahead of SimKD at weight 1 on both seeds' in text and wins(acc, L1, 'simkd').all()
    assert "L2 at its paper's weight 1: within half a point of L1 and cosine on the first pair, behind every other loss here" in text
    assert all(wins(acc, b, 'simkd').all() for b in [L1, COSINE] + TOP)


@needs_pair2
def test_second_pair_costs_are_its_runs(pair2):
    "Every deployed or projector parameter count and MFLOPs figure the reading quotes is one of its runs', and the other counts it gives are CRD's negatives and the weights of factor 1's 3x3 convolution at the teacher's width."
    import inspect
    import pandas as pd
    from kd_nb.losses import CRDLoss
    from kd_nb.models import feature_shapes, get_model
    runs, text = pair2.runs, pair2.text
    width = feature_shapes(get_model('resnet8x4', num_classes=10))[-1][0]
    negatives = inspect.signature(CRDLoss).parameters['nce_k'].default
    conv3x3 = width * width * 9
    assert f'contrasted against {negatives:,} negatives' in text and f'at {width} channels alone holding {conv3x3:,} weights' in text
    sizes = {f'{int(v):,}' for v in pd.concat([runs.deploy_params, runs.projector_params]).dropna()}
    assert set(re.findall(r'\d{1,3}(?:,\d{3})+', text)) - {f'{negatives:,}', f'{conv3x3:,}'} <= sizes
    assert set(re.findall(r'(\d+\.\d+) MFLOPs', text)) <= {f'{v / 1e6:.2f}' for v in runs.deploy_flops.dropna()}
    cost = runs.groupby('label')[['deploy_params', 'deploy_flops']].first()
    params = lambda a, b: cost.loc[a, 'deploy_params'] / cost.loc[b, 'deploy_params']   # how many times b's deployed size a is
    flops = lambda a, b: cost.loc[a, 'deploy_flops'] / cost.loc[b, 'deploy_flops']
    up, down, middle = 'simkd', 'simkd direction=down', 'simkd direction=middle'
    factor_1, factor_4, linear = 'simkd factor=1', 'simkd factor=4', 'simkd projector=linear'
    assert f"Up costs {params(up, down):.1f} times down's deployed parameters" in text
    assert f"{params(middle, up):.0%} of up's deployed parameters ({int(cost.loc[middle, 'deploy_params']):,}) and {flops(middle, up):.0%} of its FLOPs" in text
    assert f"{params(factor_1, up):.1f} times factor 2's parameters and {flops(factor_1, up):.1f} times its FLOPs" in text
    assert f"at {params(up, factor_1):.0%} of its deployed parameters" in text
    assert f"{params(factor_4, up):.0%} of factor 2's parameters" in text and f"MFLOPs, {params(linear, up):.0%} of factor 2's parameters" in text
    assert f"Factor 4, at {params(factor_4, linear):.1f} times its deployed parameters" in text


def label_metrics(metrics, runs, label):
    "The per-epoch metrics of the runs of `label`, from `metrics` (their folder's, indexed by run)."
    return metrics.loc[runs.run[runs.label == label]]


def last_pull(metrics, runs, label, loss='l2'):
    "The mean over the runs of `label` of the `loss` term's pull in each one's own last epoch."
    return label_metrics(metrics, runs, label).sort_values('epoch').groupby(level='run').tail(1)[f'train_pull_{loss}@4'].mean()


def epoch_acc(metrics, runs, label, epochs):
    "Test top-1 of each run of `label` (rows) after each of `epochs` (columns)."
    return label_metrics(metrics, runs, label).pivot(columns='epoch', values='test_acc1')[epochs]


@needs_pair2
def test_second_pair_pulls_and_epochs_are_its_runs(pair2):
    "The pulls the reading quotes at the end of training, against the first pair's, and the epochs L1 spends at chance, are read from the runs' per-epoch metrics."
    from kd_nb.run_table import load_runs, load_metrics
    at_b, text, first, second = pair2.runs, pair2.text, load_metrics(CONVERGED).set_index('run'), pair2.metrics
    converged = load_runs(CONVERGED)
    pair1 = last_pull(first, converged[converged.run.str.startswith('shape_scale/')], 'simkd')   # the runs of L2 at weight 1 that log it
    weight_1, weight_50 = (last_pull(second, at_b, label) for label in ('simkd', 'simkd loss_weight=50'))
    assert f'the pull ends training at {weight_1:.4f} here against {pair1:.3f} on the first pair, a third' in text
    assert abs(weight_1 / pair1 - 1 / 3) < 0.05 and f'at weight 50 at {weight_50:.2f}' in text
    smooth_l1 = last_pull(second, at_b, 'simkd loss=smooth_l1', 'smooth_l1')
    assert f'its pull ends training at {smooth_l1:.3f}, half of' in text and abs(smooth_l1 / weight_50 - 1 / 2) < 0.05
    weight_25 = last_pull(second, at_b, 'simkd loss_weight=25')
    assert f'its pull ends training at {weight_25:.3f}, level with smooth L1' in text and abs(weight_25 / smooth_l1 - 1) < 0.05
    l1 = last_pull(second, at_b, L1, 'l1')
    assert f"it ends training at {l1:.3f}, above L2's at weight 50" in text and l1 > weight_50
    assert 'the student sits at chance (10% top-1) through its first two epochs' in text
    assert (epoch_acc(second, at_b, L1, [1, 2]) < 11).all().all() and (epoch_acc(second, at_b, L1, [3]) > 20).all().all()
    pair1_l1 = converged[converged.run.str.startswith('converged/')]   # L1 at weight 50 on the first pair: the study at B, 3 seeds
    assert 'on the first pair L1 is past 50% after one epoch on all 3 seeds' in text
    assert (pair1_l1.label == L1).sum() == 3 and (epoch_acc(first, pair1_l1, L1, [1]) > 50).all().all()


@needs_pair2
def test_second_pair_down_at_weight_50_is_its_runs(pair2):
    "What the reading says of down at L2's weight 50 from its second epoch on (its L2 term, that term's mean squared residual, its cross-entropy and training top-1) holds on each of its runs."
    label, weight = 'simkd loss_weight=50 direction=down', 50
    m = label_metrics(pair2.metrics, pair2.runs, label)
    later = m[m.epoch >= 2]
    assert (pair2.runs.label == label).sum() == 2 and m.index.nunique() == 2
    assert 'its weighted L2 term stays under 0.05 on both seeds, a mean squared residual under 0.001' in pair2.text
    assert later['train_l2@4'].max() < 0.05 and later['train_l2@4'].max() / weight < 0.001
    assert 'the cross-entropy that trains its head stays above 1.7 and its training top-1 under 27%' in pair2.text
    assert m['train_ce'].min() > 1.7 and m['train_acc1'].max() < 27


@needs_pair2
def test_second_pair_target_shares_are_its_runs(pair2):
    "The share of a trained target's variance that differs between images, as the reading quotes it: middle's at weight 50 after its first epoch and from its second on, and down's at weight 1 (its third seed, the one run of it that logs the share) after its first and last epochs."
    m, share = pair2.metrics, 'train_target_share_l2@4'
    middle = label_metrics(m, pair2.runs, 'simkd loss_weight=50 direction=middle')
    assert middle.index.nunique() == 2 and middle[share].notna().all()
    assert 'is under 0.03 after its first epoch and under 0.005 from its second on, on both seeds' in pair2.text
    assert middle[share].max() < 0.03 and middle[middle.epoch >= 2][share].max() < 0.005
    down = label_metrics(m, pair2.runs, 'simkd direction=down').dropna(subset=[share]).sort_values('epoch')
    first, last = down[share].iloc[0], down[share].iloc[-1]
    assert down.index.nunique() == 1 and last < first
    assert f'its third seed logs a share of {first:.2f} after the first epoch, falling to {last:.2f} at the last' in pair2.text


@pytest.mark.skipif(not (CONVERGED / 'budget').is_dir(), reason="the converged study's budget curve is not in this checkout")
def test_budget_reading_quotes_the_committed_runs():
    "Every accuracy, difference and interval quoted in the reading of the budget curve is computed from the study's runs at some budget."
    from kd_nb.run_table import load_runs
    text = section('SimKD with its L2 loss climbs fastest', '\n\n')
    assert assert_quotes_hold(text, load_runs(CONVERGED)) >= 2
