"""DAG files import the package at parse time: it must not drag in torch, open_clip or faiss."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_clip_package_and_modules_stays_light():
    code = (
        "import sys\n"
        "import inspection_refresh.clip\n"
        "import inspection_refresh.clip.weights, inspection_refresh.clip.cache\n"
        "import inspection_refresh.clip.index, inspection_refresh.clip.embed, inspection_refresh.clip.synthetic\n"
        "heavy = [m for m in ('torch', 'open_clip', 'faiss', 'PIL') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
