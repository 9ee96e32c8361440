"""The report: its numbers, tables and figures from a small runs folder made here with known accuracies (one label on a
single seed, one failed run, two budgets), its files for a paper, and the summary notebook rendered to HTML; then
integration on the runs of a quick sweep, on nothing, and on partial runs."""
import json, math, re, shutil
from pathlib import Path
import pandas as pd
import papermill as pm
import pytest
from kd_nb.experiment import resolve_config, RUN_KEYS
from kd_nb.run_table import load_runs, load_metrics
from kd_nb.stats import aggregate, study_stats, axis_rows, research_axes, verdict
from kd_nb.tables import paper_table, study_table, latex_table, runs_tables
from kd_nb.cli import sweep_main as main
from conftest import ROOT
from test_sweep import run_quick_sweep

SUMMARY = ROOT / 'nbs' / 'summary.ipynb'
NONE_YET = 'No runs of this kind yet'


@pytest.fixture(scope='session')
def quick_runs(synthetic_cifar100, tmp_path_factory):
    return run_quick_sweep(synthetic_cifar100, tmp_path_factory.getbasetemp()).runs


def execute_summary(runs_dir, out):
    pm.execute_notebook(str(SUMMARY), str(out), parameters={'runs_dir': str(runs_dir), 'title': 'Test report'},
                        cwd=str(SUMMARY.parent), progress_bar=False)
    return json.loads(Path(out).read_text())


def outputs(nb):
    return [o for c in nb['cells'] if c['cell_type'] == 'code' for o in c.get('outputs', [])]


def text_of(nb):
    parts = []
    for o in outputs(nb):
        data = o.get('data', {})
        parts += [''.join(data.get(k, '')) for k in ('text/html', 'text/markdown', 'text/plain')] + [''.join(o.get('text', ''))]
    return '\n'.join(parts)


# best top-1 per seed (seeds 0, 1, 2) of each label trained for 2 epochs; kd-e4 and simkd-e4 ran 4 epochs
KNOWN = {'scratch': ({'method': 'scratch'}, [50.0, 52.0, 54.0]),
         'kd': ({'method': 'kd'}, [55.0, 58.0, 58.0]),
         'simkd': ({}, [60.0, 61.0, 65.0]),
         'simkd loss=l1': ({'loss': 'l1'}, [62.0, 60.0]),
         'simkd loss=cosine': ({'loss': 'cosine'}, [70.0]),
         'simkd projector=linear': ({'projector': 'linear'}, [50.0, 52.0]),
         'simkd-e4': ({'epochs': 4}, [66.0, 69.0]),
         'kd-e4': ({'method': 'kd', 'epochs': 4}, [59.0, 60.0])}


def write_run(root, name, acc=None, seed=0, status='done', epochs=2, **knobs):
    "A run folder as a finished (or failed) run leaves it: config.json, summary.json, metrics.csv."
    d = Path(root) / name
    d.mkdir(parents=True)
    cfg = {**resolve_config(teacher='resnet14', student='resnet8', preset='quick', epochs=epochs, seed=seed, **knobs),
           'data_source': 'official'}
    (d / 'config.json').write_text(json.dumps({'run_id': name, 'params': cfg}))
    curve = [acc * (e + 1) / epochs for e in range(epochs)] if acc is not None else []
    pd.DataFrame({'epoch': range(1, len(curve) + 1), 'test_acc1': curve}).to_csv(d / 'metrics.csv', index=False)
    (d / 'summary.json').write_text(json.dumps({
        'run_id': name, 'status': status, **{k: cfg[k] for k in RUN_KEYS}, 'best_test_acc': max(curve, default=None),
        'teacher_test_acc': None if cfg['method'] == 'scratch' else 80.0, 'teacher_source': f'teacher-s{seed}',
        'deploy_params': 1000 + 10 * len(name), 'deploy_flops': 10 ** 6, 'error': 'RuntimeError: out of memory' if status == 'failed' else None,
        'launches': [{'start': '2026-01-01 00:00:00', 'seconds': 60}]}))


@pytest.fixture(scope='module')
def known_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp('known') / 'runs'
    for key, (knobs, accs) in KNOWN.items():
        for seed, acc in enumerate(accs): write_run(root / 'study', f"{key.replace(' ', '-')}-s{seed}", acc, seed, **knobs)
    write_run(root / 'study', 'simkd-direction-down-s0', status='failed', direction='down')
    return root


def stats_of(runs_dir, epochs=2):
    stats = study_stats(load_runs(runs_dir), baselines=('simkd', 'scratch', 'kd'))
    return stats[stats.recipe.str.contains(f'{epochs} epochs')].set_index('label')


def test_known_numbers_in_means_differences_and_intervals(known_runs):
    runs, st = load_runs(known_runs), stats_of(known_runs)
    assert (runs.status == 'failed').sum() == 1 and 'simkd direction=down' not in st.index   # a failed run is no seed
    assert st.loc['kd', 'mean'] == pytest.approx(57.0) and st.loc['kd', 'n'] == 3
    kd = st.loc['kd', 'vs scratch']                                       # per seed: +5, +6, +4
    assert (kd['n'], kd['mean'], kd['std']) == (3, pytest.approx(5.0), pytest.approx(1.0))
    assert (kd['lo'], kd['hi']) == (pytest.approx(5 - 4.3027 / 3 ** 0.5, abs=1e-3), pytest.approx(5 + 4.3027 / 3 ** 0.5, abs=1e-3))
    l1 = st.loc['simkd loss=l1', 'vs simkd']                              # per seed: +2, -1
    assert l1['mean'] == pytest.approx(0.5) and l1['hi'] - l1['mean'] == pytest.approx(12.706 * 1.5, abs=1e-2)
    assert verdict(l1) == 'within noise'
    linear = st.loc['simkd projector=linear', 'vs simkd']                 # per seed: -10, -9
    assert (linear['mean'], verdict(linear)) == (pytest.approx(-9.5), 'beyond noise')
    cosine = st.loc['simkd loss=cosine']
    assert cosine.n == 1 and math.isnan(cosine.lo) and verdict(cosine['vs simkd']) == 'n=1, no interval'
    assert research_axes(st.reset_index()) == ['method', 'loss', 'projector']


def test_tables_say_n_intervals_noise_and_single_seeds(known_runs):
    st = stats_of(known_runs).reset_index()
    table = study_table(axis_rows(st, 'loss'), ('simkd',))
    assert table.columns.tolist() == ['setting', 'n', 'top-1 (%)', 'Δ vs simkd [95% CI]', 'deployed params', 'deployed MFLOPs']
    rows = table.set_index('setting')
    assert rows.index.tolist() == ['simkd loss=cosine', 'simkd', 'simkd loss=l1']         # sorted by mean
    assert rows.loc['simkd loss=cosine', 'top-1 (%)'] == '70.00 (single seed)'
    assert rows.loc['simkd loss=cosine', 'Δ vs simkd [95% CI]'] == '+10.00 (n=1, no interval)'
    assert rows.loc['simkd loss=l1', 'Δ vs simkd [95% CI]'] == '+0.50 [-18.56, +19.56] within noise'
    assert rows.loc['simkd', 'top-1 (%)'] == '62.00 ± 2.65' and rows.loc['simkd', 'n'] == 3


def assert_valid_latex(tex):
    "Balanced environments and braces, the booktabs rules in order, no special character left unescaped."
    envs = re.findall(r'\\(begin|end)\{(\w+)\}', tex)
    stack = []
    for kind, env in envs:
        if kind == 'begin': stack.append(env)
        else: assert stack and stack.pop() == env, envs
    assert not stack and ('begin', 'tabular') in envs
    unescaped = re.sub(r'\\[{}]', '', tex)
    assert unescaped.count('{') == unescaped.count('}')
    rules = [l for l in tex.splitlines() if l in ('\\toprule', '\\midrule', '\\bottomrule')]
    assert rules == ['\\toprule', '\\midrule', '\\bottomrule']
    body = tex[tex.index('\\toprule'):tex.index('\\bottomrule')]
    assert not re.search(r'(?<!\\)[%#_&]', body.replace(' & ', ' ')), body   # & only between columns
    columns = tex.split('\\begin{tabular}{')[1].split('}')[0]
    assert all(l.count(' & ') == len(columns) - 1 for l in body.splitlines() if l.endswith('\\\\')), body


def test_latex_is_booktabs_and_escaped():
    table = pd.DataFrame({'setting': ['simkd loss_options=50%', 'a & b #1'], 'n': [2, 1], 'top-1 (%)': ['1.00 ± 0.50', '2.00']})
    tex = latex_table(table, 'resnet14 → resnet8 | 50% of cifar_100', 'tab:x')
    assert_valid_latex(tex)
    assert r'simkd loss\_options=50\% & 2 & 1.00 $\pm$ 0.50 \\' in tex and r'a \& b \#1' in tex
    assert r'\caption{resnet14 $\rightarrow$ resnet8 | 50\% of cifar\_100}' in tex


@pytest.fixture(scope='module')
def rendered(known_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp('report') / 'report.html'
    assert main(['report', '--runs', str(known_runs), '--out', str(out), '--title', 'Known runs', '--tables', str(out.parent / 'paper')]) == 0
    return out


def test_report_html_names_everything_in_full_without_index(rendered):
    html = rendered.read_text()
    assert 'Known runs' in html and '95% interval: paired t over seeds' in html and 'within noise' in html
    for label in ['simkd loss=cosine', 'simkd projector=linear', 'simkd loss=l1']:
        assert f'<td>{label}</td>' in html                              # every label in full in a table
    assert '…' not in html and not re.search(r'\w\.\.\.<', html)        # nothing cut short
    assert 'class="dataframe"' not in html and '<th></th>' not in html    # no pandas index column
    assert html.count('<th>setting</th>') >= 3 and 'single seed' in html and 'RuntimeError: out of memory' in html
    for heading in ['Which method', 'Which alignment loss', 'Which projector', 'Limitations', 'Accuracy against training budget']:
        assert heading in html
    assert html.count('src="data:image/png;base64,') >= 8 and '<link' not in html and 'load_runs(' not in html
    assert 'kd-sweep report --runs' not in html                          # notes for whoever renders it stay out
    assert 'runs that logged the pull of their losses' in html and 'Figure <code>pull</code>' not in html   # no run logged a pull


def test_report_writes_tables_and_figures_for_a_paper(rendered):
    paper = rendered.parent / 'paper'
    names = {p.name for p in paper.iterdir()}
    for name in ['difference-vs-simkd', 'difference-vs-scratch', 'top1-method', 'top1-loss', 'top1-projector', 'cost', 'budget']:
        assert {f'{name}.pdf', f'{name}.png'} <= names, name
    assert (paper / 'budget.pdf').read_bytes().startswith(b'%PDF')
    tables = sorted(p for p in paper.glob('*.tex'))
    assert {'table-loss.tex', 'table-projector.tex'} <= {p.name for p in tables}
    assert len([p for p in tables if p.name.startswith('table-method-')]) == 2   # the method axis in both budgets
    for tex in tables: assert_valid_latex(tex.read_text())
    md = (paper / 'table-loss.md').read_text()
    assert md.startswith('| setting | n | top-1 (%) | Δ vs simkd [95% CI] | deployed params | deployed MFLOPs |') and '| simkd loss=cosine | 1 |' in md


def test_report_answers_at_the_budget_its_curve_chooses(known_runs, tmp_path):
    """With scratch on the curve too, the curve's labels are answered at the budget it chooses and the study's at its own;
    a setting that only repeats the curve's labels at another budget stays in the budget section."""
    runs = tmp_path / 'runs'; shutil.copytree(known_runs, runs)
    for seed, acc in enumerate([55.0, 56.0]): write_run(runs / 'study', f'scratch-e4-s{seed}', acc, seed, method='scratch', epochs=4)
    for key, knobs, acc in [('scratch', {'method': 'scratch'}, 30.0), ('kd', {'method': 'kd'}, 20.0), ('simkd', {}, 25.0)]:
        for seed in (0, 1): write_run(runs / 'study', f'{key}-e1-s{seed}', acc + seed, seed, epochs=1, **knobs)
    text = text_of(execute_summary(runs, tmp_path / 'report.ipynb'))
    assert '`choose_budget` picks 8,000 from it' in text and 'Accuracy against training budget' in text
    assert 'answered there and at 4,000, where the study ran the labels the curve does not hold' in text
    assert 'Which alignment loss' in text and 'simkd loss=cosine' in text                        # the 2-epoch study stays whole
    answered = text.split('Accuracy against training budget')[0]
    assert '4 epochs' in answered and '2 epochs' in answered and '1 epoch,' not in answered     # 1 epoch: the curve's labels only


def test_report_shows_the_deployment_figure_and_table(tmp_path):
    "A folder with deployed runs gets the deployment section: the accuracy-against-latency figure and the table of its files."
    from kd_nb.run_table import example_deployed_runs, load_deploy
    from kd_nb.stats import deploy_stats
    from kd_nb.tables import deploy_table, deploy_caption, html_table
    runs = example_deployed_runs(tmp_path / 'runs')
    text = text_of(execute_summary(runs, tmp_path / 'report.ipynb'))
    rows = deploy_stats(load_runs(runs), load_deploy(runs))
    assert 'Figure `deploy`: top-1 in ONNX Runtime' in text
    assert html_table(deploy_table(rows), deploy_caption(rows)) in text and "runs deployed by `kd-deploy study`" not in text


def test_report_shows_how_hard_each_loss_pulls(tmp_path):
    "Runs that logged the pull of their loss get the pull figure and a table of its first and last epoch: the mean of the seeds' CSV values."
    runs = tmp_path / 'runs'
    pulls = {'simkd': ({}, [[0.5, 0.25], [1.0, 0.5]]), 'w25': ({'loss_weight': 25}, [[8.0, 4.0], [16.0, 8.0]])}
    for key, (knobs, per_seed) in pulls.items():
        for seed, values in enumerate(per_seed):
            write_run(runs / 'study', f'{key}-s{seed}', 60.0 + seed, seed, **knobs)
            csv = runs / 'study' / f'{key}-s{seed}' / 'metrics.csv'
            pd.read_csv(csv).assign(**{'train_pull_l2@4': values}).to_csv(csv, index=False)
    write_run(runs / 'study', 'scratch-s0', 50.0, method='scratch')
    out = tmp_path / 'report' / 'index.html'
    assert main(['report', '--runs', str(runs), '--out', str(out), '--tables', str(tmp_path / 'paper')]) == 0
    text = text_of(json.loads(out.with_suffix('.ipynb').read_text()))
    assert 'Figure `pull`: the pull' in text and 'runs that logged the pull of their losses' not in text
    assert '<tr><td>simkd loss_weight=25</td><td>l2@4</td><td>2</td><td>1 → 2</td><td>12</td><td>6</td><td>0.50</td></tr>' in text
    assert '<tr><td>simkd</td><td>l2@4</td><td>2</td><td>1 → 2</td><td>0.75</td><td>0.375</td><td>0.50</td></tr>' in text
    assert {'pull.pdf', 'pull.png', 'table-pull.md', 'table-pull.tex'} <= {p.name for p in (tmp_path / 'paper').iterdir()}
    assert_valid_latex((tmp_path / 'paper' / 'table-pull.tex').read_text())


def test_readme_tables_come_from_runs(known_runs):
    text = runs_tables(known_runs, ('scratch',))
    assert text.count('| setting | n |') == 2 and '| kd | 3 | 57.00 ± 1.73 | +5.00 [+2.52, +7.48] |' in text
    with pytest.raises(ValueError, match="baseline: no finished runs labelled 'fitnet'"):
        runs_tables(known_runs, ('fitnet',))


@pytest.mark.slow
def test_results_of_the_quick_sweep(quick_runs):
    runs = load_runs(quick_runs)
    assert len(runs) == 12 and set(runs.status) == {'done'} and set(runs.sweep) == {'tiny'}, runs[['run', 'status', 'error']]
    assert sorted(set(runs.label)) == ['fitnet', 'kd', 'scratch', 'simkd', 'simkd layers=3,4 layer_weights=increasing',
                                       'simkd loss=cosine']
    agg = aggregate(runs, by=['pair', 'label'])
    assert (agg.n == 2).all() and (agg.seeds.map(tuple) == (0, 1)).all()
    table = paper_table(runs)
    assert table.index.get_level_values('teacher → student').tolist() == ['resnet14 → resnet8']
    assert all(' ± ' in v for v in table.iloc[0].tolist()[:5]) and '(simkd ' in table.iloc[0]['best variant']
    metrics = load_metrics(quick_runs)
    assert len(metrics) == 12 and set(metrics.epoch) == {1}


@pytest.mark.slow
def test_report_of_quick_sweep_renders_figures_table_and_html(quick_runs, tmp_path):
    out = tmp_path / 'report' / 'index.html'
    assert main(['report', '--runs', str(quick_runs), '--out', str(out), '--title', 'Quick sweep']) == 0
    nb = json.loads(out.with_suffix('.ipynb').read_text())             # the executed notebook, kept beside the HTML
    assert not [o for o in outputs(nb) if o['output_type'] == 'error']
    images = [o for o in outputs(nb) if 'image/png' in o.get('data', {})]
    assert len(images) >= 7                                              # 2 forest plots, method, loss, layers, cost, curves
    text = text_of(nb)
    assert 'Quick sweep' in text and 'resnet14 → resnet8' in text and 'Which alignment loss' in text and 'Which layers' in text
    assert '<td>simkd layers=3,4 layer_weights=increasing</td>' in text and '<td>fitnet</td>' in text
    assert text.count(NONE_YET) == 3                                     # one budget, no speed settings, nothing deployed
    assert 'Figure `pull`' in text                                       # trained by eager steps on the CPU: the pull logged
    assert 'No incomplete or failed runs' in text
    html = out.read_text()
    assert '<table' in html and 'Δ vs scratch [95% CI]' in html and 'resnet14 → resnet8' in html
    assert html.count('<img ') >= 4 and html.count('src="data:image/png;base64,') >= 4   # figures embedded
    assert '<link' not in html and '<style' in html                      # styles inline (MathJax comes from a CDN)
    assert 'load_runs(' not in html                                      # code hidden


@pytest.mark.slow
def test_summary_on_empty_runs_dir(tmp_path):
    nb = execute_summary(tmp_path / 'no-runs-yet', tmp_path / 'out.ipynb')
    text = text_of(nb)
    assert text.count(NONE_YET) == 9 and '0 runs, 0 finished' in text and 'No incomplete or failed runs' in text
    assert not [o for o in outputs(nb) if 'image/png' in o.get('data', {})]


@pytest.mark.slow
def test_summary_with_some_kinds_of_runs_and_failures(quick_runs, tmp_path):
    runs = tmp_path / 'runs'
    for name in ('scratch-resnet8-s0', 'scratch-resnet8-s1'):
        shutil.copytree(quick_runs / 'tiny' / name, runs / 'alone' / name)
    broken = runs / 'alone' / 'simkd-resnet14-resnet8-s0'
    shutil.copytree(quick_runs / 'tiny' / broken.name, broken)
    summary = json.loads((broken / 'summary.json').read_text())
    (broken / 'summary.json').write_text(json.dumps({**summary, 'status': 'failed', 'error': 'RuntimeError: CUDA out of memory'}))
    early = runs / 'alone' / 'kd-resnet14-resnet8-s0'
    early.mkdir()
    (early / 'notebook.ipynb').write_text(json.dumps({'cells': [{'cell_type': 'code', 'outputs': [
        {'output_type': 'error', 'ename': 'ValueError', 'evalue': 'data_dir: no CIFAR-100 here', 'traceback': []}]}]}))
    nb = execute_summary(runs, tmp_path / 'out.ipynb')
    text = text_of(nb)
    assert '4 runs, 2 finished' in text
    assert text.count(NONE_YET) == 8                                     # only scratch runs finished: nothing to compare, deployed or pulled
    assert 'RuntimeError: CUDA out of memory' in text and 'ValueError: data_dir: no CIFAR-100 here' in text
    assert not [o for o in outputs(nb) if 'image/png' in o.get('data', {})]


def test_quarto_project_publishes_components_and_report(tmp_path):
    import re, subprocess, yaml
    q = yaml.safe_load((ROOT / '_quarto.yml').read_text())
    assert q['project']['type'] == 'website' and q['execute'] == {'enabled': True, 'freeze': 'auto'}
    render = q['project']['render']
    components = sorted(f'nbs/{p.name}' for p in (ROOT / 'nbs').glob('[0-9][0-9]_*.ipynb'))
    assert render == ['nbs/index.ipynb', *components, 'nbs/summary.ipynb'] and len(components) >= 17
    assert all((ROOT / p).is_file() for p in render) and 'nbs/run_experiment.ipynb' not in render
    listed = re.findall(r'nbs/\w+\.ipynb', yaml.safe_dump(q['website']['sidebar']))
    assert set(listed) == set(render)
    # post-render is split as Quarto splits it (double quotes group words, no shell) and run from the project folder
    args = [a.replace('\0', ' ') for a in re.sub(r'"([^"]*)"?', lambda m: m.group(1).replace(' ', '\0'), q['project']['post-render']).split()]
    subprocess.run(args, cwd=tmp_path, check=True)
    assert 'url=nbs/index.html' in (tmp_path / '_site' / 'index.html').read_text()
    front = json.loads(SUMMARY.read_text())['cells'][0]
    assert front['cell_type'] == 'raw' and 'skip_exec: true' in ''.join(front['source'])
    params = [c for c in json.loads(SUMMARY.read_text())['cells'] if 'parameters' in c['metadata'].get('tags', [])]
    assert len(params) == 1 and 'runs_dir = "runs"' in ''.join(params[0]['source'])
