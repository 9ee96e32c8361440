"""What the project commits besides code: result and benchmark files that name no folder of the machines that made them,
run folders that all say how they ran, and the results modules importing one way, from run folders to the page."""
import json, re
from pathlib import Path
import pytest
from conftest import ROOT

# a folder of a machine: a home, a temporary or a work folder, wherever it appears in a string
MACHINE_FOLDER = re.compile(r'(?<![\w.:/~-])/(?:work|root|home|tmp|Users|mnt|opt|usr|var|scratch|data|private)/')
PATH_FIELD = re.compile(r'(?:_dir|_path|path|_ckpt|_run|_source)$')   # a field that holds a path: relative, never from '/'


def strings(value, key=''):
    "Every string in a JSON value, with the key it is under (the list's key for items of a list)."
    if isinstance(value, dict):
        for k, v in value.items(): yield from strings(v, k)
    elif isinstance(value, list):
        for v in value: yield from strings(v, key)
    elif isinstance(value, str): yield key, value


def absolute_paths(value) -> list:
    "The (key, string) pairs of a JSON value that name an absolute path."
    return [(k, s) for k, s in strings(value) if MACHINE_FOLDER.search(s) or (PATH_FIELD.search(k) and s.startswith('/'))]


def committed_json():
    return [p for top in ('results', 'benchmarks') for p in sorted((ROOT / top).rglob('*'))
            if p.suffix in ('.json', '.ipynb') and p.is_file()]


def test_absolute_paths_are_found():
    "The check below catches what it is for, and nothing that is only a URL or a relative path."
    assert absolute_paths({'params': {'runs_dir': '/work/main/results/x'}}) == [('runs_dir', '/work/main/results/x')]
    assert absolute_paths({'teacher_source': '/srv/teachers/best.pt'}) == [('teacher_source', '/srv/teachers/best.pt')]
    assert absolute_paths({'outputs': [{'text': ['new run /tmp/check/gpu-check/a\n']}]})
    assert absolute_paths({'text': 'see https://github.com/home/work/x', 'runs_dir': 'results/x', 'loss': 'a/b'}) == []


def test_results_and_benchmarks_name_no_folder_of_a_machine():
    "Run folders, reports and benchmarks record paths relative to the project root, so they read the same in any checkout."
    files = committed_json()
    assert len(files) > 100
    found = {str(p.relative_to(ROOT)): hits[:3] for p in files if (hits := absolute_paths(json.loads(p.read_text())))}
    assert not found, found


def test_sweep_logs_name_no_folder_of_a_machine():
    "A run's sweep log (papermill's lines and the run's own output) names the notebooks, the working directory and each warning's source from the project root."
    logs = sorted((ROOT / 'results').rglob('_sweep/*.log'))
    assert len(logs) > 100
    found = {str(p.relative_to(ROOT)): hits[:3] for p in logs
             if (hits := [line for line in p.read_text(errors='replace').splitlines() if MACHINE_FOLDER.search(line)])}
    assert not found, found


def test_every_committed_run_folder_says_how_it_ran():
    "Each folder under results/ with a summary.json (students and cached teachers alike) has its config.json."
    summaries = sorted((ROOT / 'results').rglob('summary.json'))
    assert len(summaries) > 100
    missing = [str(s.parent.relative_to(ROOT)) for s in summaries if not (s.parent / 'config.json').is_file()]
    assert not missing, missing


LAYERS = ['run_table', 'stats', 'findings', ('tables', 'figures'), 'report']   # from run folders to the page


def test_results_modules_import_one_way():
    "Each results module imports only those before it: reading runs <- statistics <- findings <- tables and figures <- report."
    order = {m: i for i, layer in enumerate(LAYERS) for m in ([layer] if isinstance(layer, str) else layer)}
    for module, rank in order.items():
        text = (ROOT / 'kd_nb' / f'{module}.py').read_text()
        imported = set(re.findall(r'^from \.(\w+) import', text, re.M)) & set(order)
        assert all(order[m] < rank for m in imported), (module, imported)
        assert len(text.splitlines()) <= 400, module
    assert not (ROOT / 'kd_nb' / 'results.py').exists()


def test_deployed_models_of_seed_0_are_committed_under_1_mb_and_the_other_seeds_ignored():
    "A deployed study commits every run's export.json and benches, and the ONNX files of seed 0 alone, each under 1 MB."
    import subprocess
    run = 'results/study/deploy/simkd-resnet20-resnet8-s{}/deploy/{}'
    paths = [run.format(s, f) for s in (0, 1, 10) for f in ('model.onnx', 'model.int8.onnx', 'export.json', 'bench-cpu-host-20260101-000000.json')]
    r = subprocess.run(['git', 'check-ignore', '--no-index', '--stdin'], input='\n'.join(paths), cwd=ROOT, capture_output=True, text=True)
    assert sorted(r.stdout.split()) == sorted(p for p in paths if p.endswith('.onnx') and '-s0/' not in p)
    committed = subprocess.run(['git', 'ls-files', '--', 'results/*.onnx'], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert all('-s0/deploy/' in p for p in committed), committed
    assert not {p: s for p in committed if (s := (ROOT / p).stat().st_size) >= 1_000_000}


def test_second_pair_reuses_the_first_pairs_scratch_runs():
    "The second pair's scratch resnet8 is the first pair's committed run, linked, not trained again: same student and recipe."
    from kd_nb.runs import RunFolder
    from kd_nb.sweep import load_sweep, expand, validate
    recipe = lambda c: {k: c[k] for k in ('student', 'dataset', 'preset', 'epochs', 'train_limit', 'lr_milestones', 'lr', 'batch_size')}
    sweep = load_sweep(ROOT / 'sweeps' / 'cifar10_pair2.yaml')
    pair2 = validate(sweep, expand(sweep))[0]
    reused = sorted((ROOT / 'results' / 'cifar10-jpeg-pair2' / 'reused').iterdir())
    assert len(reused) == 3 and all(p.is_symlink() for p in reused)
    for link in reused:
        run = RunFolder(link.resolve())
        assert run.path.is_relative_to((ROOT / 'results' / 'cifar10-jpeg-converged').resolve()), link
        assert run.summary['status'] == 'done' and run.params['method'] == 'scratch', link
        assert recipe(run.params) == recipe(pair2), link
    assert {RunFolder(p).params['seed'] for p in reused} == {0, 1, 2}
