"""README.md is written from nbs/index.ipynb, the landing page of the documentation: its markdown cells, in order.

    python .ci/readme.py            # fill the results tables of nbs/index.ipynb from their runs, then write README.md
    python .ci/readme.py --check    # exit 1 if a results table differs from its runs or README.md from nbs/index.ipynb (CI)

Edit nbs/index.ipynb, never README.md. A results table sits between `<!-- table: RUNS vs B1,B2 -->` and
`<!-- /table -->` and is never typed: kd_nb.tables.fill_tables writes it from the runs in RUNS. (nbdev_readme, run by
nbdev_prepare and nbdev_docs where Quarto is installed, renders the same cells through Quarto.)
"""
import json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INDEX = ROOT / 'nbs' / 'index.ipynb'
HEADER = '<!-- Written from nbs/index.ipynb by .ci/readme.py: edit the notebook, not this file. -->\n\n'


def readme_text(index=INDEX) -> str:
    cells = json.loads(Path(index).read_text())['cells']
    parts = [''.join(c['source']).strip() for c in cells if c['cell_type'] == 'markdown']
    return HEADER + '\n\n'.join(p for p in parts if p) + '\n'


def filled_index(index=INDEX) -> str:
    "The text of `index` with every results table written again from its runs."
    from kd_nb.tables import fill_tables
    nb = json.loads(Path(index).read_text())
    for c in nb['cells']:
        if c['cell_type'] == 'markdown':
            c['source'] = fill_tables(''.join(c['source']), ROOT).splitlines(keepends=True)
    return json.dumps(nb, indent=1, ensure_ascii=False) + '\n'


if __name__ == '__main__':
    readme = ROOT / 'README.md'
    if '--check' in sys.argv[1:]:
        if filled_index() != INDEX.read_text():
            sys.exit('a results table of nbs/index.ipynb differs from its runs: run python .ci/readme.py')
        if readme.read_text() != readme_text():
            sys.exit('README.md differs from nbs/index.ipynb: run python .ci/readme.py (and edit the notebook, not README.md)')
        print('README.md is nbs/index.ipynb, and its results tables are their runs')
    else:
        INDEX.write_text(filled_index())
        readme.write_text(readme_text())
        print(f'wrote {INDEX} and {readme}')
