"The documentation build executes every notebook as nbdev's docs processor does, and README.md is the landing page."
import subprocess, sys
import pytest
from conftest import ROOT


@pytest.mark.slow
def test_docs_processing_executes_every_notebook():
    "nbdev_docs (with Quarto) starts with nbdev_proc_nbs, which runs the exported, import and show_doc cells of every notebook."
    r = subprocess.run(['nbdev_proc_nbs', '--force'], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert sorted(p.name for p in (ROOT / '_proc').glob('[0-9][0-9]_*.ipynb')) == \
        sorted(p.name for p in (ROOT / 'nbs').glob('[0-9][0-9]_*.ipynb'))


def test_readme_is_written_from_the_landing_page():
    r = subprocess.run([sys.executable, str(ROOT / '.ci' / 'readme.py'), '--check'], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


STUDY = ROOT / 'results' / 'cifar10-jpeg-cpu'


@pytest.mark.skipif(not (STUDY / 'cifar10_cpu').is_dir(), reason='the study on real pixels is not in this checkout')
def test_readme_results_are_the_committed_runs():
    "The README's table of the study on real pixels is what kd_nb.tables writes from the committed run folders."
    from kd_nb.run_table import load_runs
    from kd_nb.tables import runs_tables
    runs = load_runs(STUDY / 'cifar10_cpu')
    assert len(runs) == 32 and set(runs.status) == {'done'} and set(runs.data_source) == {'imported: cifar10-jpeg.tar.gz (lossy)'}
    table = runs_tables(STUDY / 'cifar10_cpu', ('scratch', 'kd'))
    assert table.count('\n| ') == 14 and table in (ROOT / 'README.md').read_text()   # a row per label, after the header
    assert (STUDY / 'report.html').is_file() and (STUDY / 'report.ipynb').is_file()


def test_export_cells_stay_small():
    "A reader sees one idea per exported cell: a median of at most 12 lines, none over 40 (the `#| export` line counts)."
    import json, statistics
    sizes = {}
    for nb in sorted((ROOT / 'nbs').glob('[0-9][0-9]_*.ipynb')):
        for i, cell in enumerate(json.loads(nb.read_text())['cells']):
            source = ''.join(cell['source'])
            if cell['cell_type'] == 'code' and source.startswith('#| export'): sizes[f'{nb.name} cell {i}'] = len(source.splitlines())
    assert len(sizes) > 100
    assert statistics.median(sizes.values()) <= 12
    assert not {k: n for k, n in sizes.items() if n > 40}
