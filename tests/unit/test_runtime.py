"""Process setup: where a run may keep its run dir on a cluster (the Ray connection itself: every Ray test's fixture,
and the job-submit scenario in tests/e2e)."""

import pytest

from leaml_ray.config import load_config
from leaml_ray.errors import UserError


def test_a_local_run_dir_is_refused_where_other_nodes_would_write(ray_local, tmp_path):
    from leaml_ray.runtime import check_run_dir_for_cluster

    local = f"run.dir={tmp_path / 'run'}"
    check_run_dir_for_cluster(load_config(None, [local]))  # one CPU node: every stage runs here
    # GPU stages on a cluster without GPUs yet: the autoscaler will add nodes that cannot see this disk
    with pytest.raises(UserError, match="run.dir .* is a local path on a cluster"):
        check_run_dir_for_cluster(load_config(None, [local, "train.device=gpu"]))
    check_run_dir_for_cluster(load_config(None, [local, "train.device=gpu", "run.shared_fs=true"]))
    check_run_dir_for_cluster(load_config(None, ["run.dir=s3://bucket/run", "target.device=gpu"]))
