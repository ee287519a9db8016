"""Shared expectations of the T2I trainer tests."""

import math

#: the logistic losses (dpo, ddspo) at step 1, where the policy equals the reference: s = 0
LOG2 = math.log(2.0)
#: how far from log 2 step 1 may land on any CPU. The policy and the reference run the same
#: weights in batches of different sizes, whose conv/matmul kernels round differently on some
#: CPUs (forced AVX2 here: predictions ~1e-10 apart); beta (up to 16000) scales that into the
#: logit s, and the loss is log 2 - s/2. A reference that is not the base is off by far more.
LOG2_TOL = 1e-4
