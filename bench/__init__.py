"""The text-to-image side: the library ``bench.t2i`` and the commands ``bench/*.py``.

Everything here reads local files only: the Hugging Face hub is put offline before any
of its modules is imported (an explicit ``HF_HUB_OFFLINE=0`` in the environment wins).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
