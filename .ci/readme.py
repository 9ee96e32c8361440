"""README.md is written from nbs/index.ipynb, the landing page of the documentation: its markdown cells, in order.

    python .ci/readme.py            # write README.md
    python .ci/readme.py --check    # exit 1 if README.md is not what nbs/index.ipynb says (CI)

Edit nbs/index.ipynb, never README.md. (nbdev_readme, run by nbdev_prepare and nbdev_docs where Quarto is installed,
renders the same cells through Quarto; this script needs nothing but Python.)
"""
import json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = '<!-- Written from nbs/index.ipynb by .ci/readme.py: edit the notebook, not this file. -->\n\n'


def readme_text(index=ROOT / 'nbs' / 'index.ipynb') -> str:
    cells = json.loads(Path(index).read_text())['cells']
    parts = [''.join(c['source']).strip() for c in cells if c['cell_type'] == 'markdown']
    return HEADER + '\n\n'.join(p for p in parts if p) + '\n'


if __name__ == '__main__':
    text, readme = readme_text(), ROOT / 'README.md'
    if '--check' in sys.argv[1:]:
        if readme.read_text() != text:
            sys.exit('README.md differs from nbs/index.ipynb: run python .ci/readme.py (and edit the notebook, not README.md)')
        print('README.md is nbs/index.ipynb')
    else:
        readme.write_text(text)
        print(f'wrote {readme}')
