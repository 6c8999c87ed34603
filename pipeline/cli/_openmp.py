"""OpenMP wait policy of the ``demix`` process, set before torch (and its libgomp) is imported.

torch's CPU kernels run on libgomp, whose idle workers spin (about 300k iterations) at every barrier
of a parallel region, except when libgomp manages more threads than there are CPUs: then every team
spins only ~100 iterations and sleeps on a futex. ``demix separate`` runs the network in the model
thread and torch ops in its decode, cut and encode threads, so on a small machine (2 cores) its model
team is throttled while a forward in a lone main thread spins; which of the two is faster depends on
the load (spinning threads steal the cores others need: 2-4x slower forwards on a loaded 2-core box).
``PASSIVE`` gives every team the same behaviour, sleeping at once, whatever the thread and the load.
A value the user set is kept.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
