"""Block sizes of Ray Data datasets: the one private Ray Data call (ray 2.60's logical plan)."""

from __future__ import annotations

import ray.data


def in_blocks_of(ds: ray.data.Dataset, rows: int) -> ray.data.Dataset:
    """`ds` cut into blocks of at most `rows` rows (small ones combined) by light (0.1 CPU) streaming tasks.

    A map stage emits its output when its input block is done, and each block is a round trip for a train worker,
    so block size sets how results stream and how input flows. `Dataset.repartition` gives its tasks a whole CPU
    and takes no ray_remote_args; engine actors or a Serve replica may hold those CPUs (the pipeline then waits
    forever), hence the replaced remote args (ray 2.60's logical plan).
    """
    import dataclasses

    from ray.data._internal.logical.interfaces import LogicalPlan

    cut = ds.repartition(target_num_rows_per_block=rows)
    op = dataclasses.replace(cut._logical_plan.dag, ray_remote_args={"num_cpus": 0.1})
    return ray.data.Dataset._from_parent(ds, LogicalPlan(op, ds.context))
