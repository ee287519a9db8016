"""The DDSPO paper's 2D toy (Sec. 4.1, Fig. 1, Appendix B) on the minddspo core.

Threads: torch's OpenMP workers spin briefly while they wait for the next op. On a quiet
machine that is the fastest setting (the references train 2x faster than with
``OMP_WAIT_POLICY=PASSIVE``, measured); on a machine where another process holds a core it
is the slowest (3-16x measured). ``toy2d.run`` therefore uses one thread unless
``--threads`` says otherwise; give the sweeps ``--threads 1`` there (toy2d/README.md, "Speed").
"""

from minddspo import extras

# a toy command run without the ``toy`` extra ends with one line naming it
extras.install(dict.fromkeys(("matplotlib", "tqdm", "safetensors", "filelock"), "toy"))
