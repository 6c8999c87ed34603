"""CPU host workers are sized so that each fits on one node of the cluster (a worker asking for all the
cluster's CPUs could never be placed on a cluster of several nodes)."""

from __future__ import annotations

import pytest

from demix.pipeline.batch.cluster import _cpu_workers


@pytest.mark.parametrize(
    "workers, cpus, nodes, expected",
    [
        (None, 2, [2], (1, 2.0)),  # one machine: one worker with all its CPUs, as before
        (None, 16, [8, 8], (2, 8.0)),  # two nodes: one worker per node
        (None, 3, [1, 2], (3, 1.0)),  # uneven nodes: shares of the smallest node, every CPU used
        (1, 16, [8, 8], (1, 8.0)),  # one worker asked for: at most one node's CPUs
        (3, 3, [1, 2], (3, 1.0)),
        (4, 2, [2], (4, 1.0)),  # more workers than CPUs: one CPU each (Ray queues the rest)
    ],
)
def test_cpu_workers_fit_on_a_node(workers, cpus, nodes, expected):
    r = _cpu_workers(workers, cpus, nodes)
    assert (r.actors, r.cpus_per_actor) == expected
    assert r.cpus_per_actor <= max(nodes)
