"Integration: the summary notebook and its HTML rendering, on the runs of a quick sweep, on nothing, and on partial runs."
import json, shutil
from pathlib import Path
import papermill as pm
import pytest
from kd_nb.results import load_runs, load_metrics, aggregate, paper_table
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
    assert len(images) >= 4                                              # loss, layers, cost, learning curves
    text = text_of(nb)
    assert 'Quick sweep' in text and 'resnet14 → resnet8' in text and 'best variant' in text and 'FitNet' in text
    assert text.count(NONE_YET) == 3                                     # no projector, direction or speed-setting runs
    assert 'No incomplete or failed runs' in text
    html = out.read_text()
    assert '<table' in html and 'best variant' in html and 'resnet14 → resnet8' in html
    assert html.count('<img ') >= 4 and html.count('src="data:image/png;base64,') >= 4   # figures embedded
    assert '<link' not in html and '<style' in html                      # styles inline (MathJax comes from a CDN)
    assert 'load_runs(' not in html                                      # code hidden


@pytest.mark.slow
def test_summary_on_empty_runs_dir(tmp_path):
    nb = execute_summary(tmp_path / 'no-runs-yet', tmp_path / 'out.ipynb')
    text = text_of(nb)
    assert text.count(NONE_YET) == 8 and '0 runs, 0 finished' in text and 'No incomplete or failed runs' in text
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
    assert text.count(NONE_YET) == 6                                     # only scratch runs finished: no table, no studies
    assert 'RuntimeError: CUDA out of memory' in text and 'ValueError: data_dir: no CIFAR-100 here' in text
    assert len([o for o in outputs(nb) if 'image/png' in o.get('data', {})]) == 2   # cost and learning curves


def test_quarto_project_publishes_components_and_report(tmp_path):
    import re, subprocess, yaml
    q = yaml.safe_load((ROOT / '_quarto.yml').read_text())
    assert q['project']['type'] == 'website' and q['execute'] == {'enabled': True, 'freeze': 'auto'}
    render = q['project']['render']
    components = sorted(f'nbs/{p.name}' for p in (ROOT / 'nbs').glob('[0-9][0-9]_*.ipynb'))
    assert render == ['nbs/index.ipynb', *components, 'nbs/summary.ipynb'] and len(components) == 13
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
