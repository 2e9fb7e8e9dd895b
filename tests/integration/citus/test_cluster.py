"""The cluster the Citus tests run on: a coordinator and two active workers."""

from __future__ import annotations


def test_the_cluster_has_a_coordinator_and_two_workers(citus_db):
    rows = citus_db.scalar(
        "SELECT json_agg(json_build_array(noderole, isactive) ORDER BY groupid) FROM pg_dist_node"
    )
    assert rows == [["primary", True]] * 3
    assert citus_db.scalar("SELECT count(*) FROM citus_get_active_worker_nodes()") == 2
