"""/metrics is the whole application's: after a load through pd, the router's page
holds the request latencies it measured and both pools' engine series, per replica."""

from __future__ import annotations

import httpx

from tests.ray_cluster import wait_until
from tests.reliability.conftest import complete


def series(url: str) -> list[str]:
    return [line for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines()
            if line.startswith("tandem_")]


def test_metrics_show_both_pools_after_a_load(cluster):
    for i in range(4):
        assert complete(cluster, f"metrics load {i}", max_tokens=8).status_code == 200
    def published():        # replicas publish every second: wait for the decode pool's transfers
        lines = series(cluster)
        return any(x.startswith("tandem_kv_transfer_bytes_total") and 'pool="decode"' in x and 'replica="' in x
                   and float(x.rsplit(" ", 1)[1]) > 0 for x in lines), "\n".join(lines)[-2000:]
    wait_until(published, "both pools' series in /metrics", 30)
    lines = series(cluster)

    def having(name: str, *labels: str) -> list[str]:
        return [x for x in lines if x.startswith(name) and all(lab in x for lab in labels)]
    assert having("tandem_time_to_first_token_seconds_count", 'pool="decode"')
    assert having("tandem_e2e_request_latency_seconds_count", 'pool="decode"')
    for pool in ("prefill", "decode"):
        for gauge in ("tandem_num_requests_running", "tandem_num_requests_waiting", "tandem_kv_cache_usage_perc"):
            assert having(gauge, f'pool="{pool}"', 'replica="'), (gauge, pool)
    moved = having("tandem_kv_transfer_bytes_total", 'pool="decode"', 'replica="')
    assert moved and sum(float(x.rsplit(" ", 1)[1]) for x in moved) > 0
    # One family per name (a valid exposition), whatever the number of replicas.
    types = [x for x in httpx.get(f"{cluster}/metrics", timeout=10).text.splitlines() if x.startswith("# TYPE")]
    assert len(types) == len(set(types))
