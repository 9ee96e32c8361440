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
