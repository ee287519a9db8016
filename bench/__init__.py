"""The text-to-image side: the library ``bench.t2i`` and the commands ``bench/*.py``.

Everything here reads local files only: the Hugging Face hub is put offline before any
of its modules is imported (an explicit ``HF_HUB_OFFLINE=0`` in the environment wins).
A command run without the extra it needs ends with one line naming it
(:mod:`minddspo.extras`), not an import traceback.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from minddspo import extras  # noqa: E402

#: optional module -> the extra that installs it, for the T2I commands
EXTRA_OF_MODULE = {
    **dict.fromkeys(("diffusers", "transformers", "peft", "PIL", "safetensors", "tqdm"), "t2i"),
    "pyarrow": "import",  # import_pairs.py --from pickapic
    "sklearn": "digits",  # python -m bench.digits: DigitEval's classifier
    "scipy": "digits",  # scikit-learn's, and the digits FID
    "matplotlib": "plot",
}
extras.install(EXTRA_OF_MODULE, {"python -m bench.digits": "digits"})
