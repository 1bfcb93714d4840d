"""The per-rank load window and EPLB's metric hooks (one process, no group)."""

from __future__ import annotations

import pytest
import torch

from engine.layers.expert_map import ExpertMap
from engine.layers.moe import FusedMoE
from eplb.load_stats import ExpertLoadWindow
from eplb.metrics import HISTORY, EplbStats, layer_groups


def _layers() -> list[FusedMoE]:
    """Two layers of 3 experts in 4 slots; slot 3 starts empty."""
    torch.manual_seed(0)
    layers = [FusedMoE(3, 8, 4, num_physical=4) for _ in range(2)]
    for moe in layers:
        moe.set_expert_map(ExpertMap.from_phy2log([[0, 1, 2, -1]], 3))
    return layers


def _route(moe: FusedMoE, ids: list[list[int]]) -> None:
    ids_t = torch.tensor(ids)
    x = torch.randn(len(ids), 8)
    with torch.inference_mode():
        moe(x, torch.ones(ids_t.shape), ids_t)


def test_window_folds_counts_through_the_current_map_and_slides() -> None:
    a, b = _layers()
    win = ExpertLoadWindow([a, b], window_size=2)
    _route(a, [[0, 1], [0, 2]])
    win.record()
    assert int(a.expert_load.sum()) == 0, "record() hands the step's counts to the window"
    # Swap layer a's map: expert 0 now has two replicas (slots 0 and 3).
    a.set_expert_map(ExpertMap.from_phy2log([[0, 1, 2, 0]], 3))
    win.rebind()
    _route(a, [[1, 0], [2, 0]])     # pairs 1 and 3 pick expert 0: replica (index % 2) = slot 3
    win.record()
    logical, physical = win.collect()
    assert logical.tolist() == [[4, 2, 2], [0, 0, 0]]
    assert physical.tolist() == [[2, 2, 2, 2], [0, 0, 0, 0]]
    _, physical = win.collect()
    assert int(physical.sum()) == 0, "physical counts restart at each collection"
    for _ in range(2):                    # two empty steps push both out of the window
        win.record()
    logical, _ = win.collect()
    assert int(logical.sum()) == 0


def test_layer_groups_bound_the_series() -> None:
    assert [list(g) for g in layer_groups(3)] == [[0], [1], [2]]
    groups = layer_groups(58)
    assert len(groups) == 8 and [i for g in groups for i in g] == list(range(58))
    seen = []
    stats = EplbStats()
    stats.subscribe(lambda kind, name, value, labels: seen.append(labels.get("layer")))
    stats.set_load([1.0] * 16, [])
    assert seen == ["0-1", "2-3", "4-5", "6-7", "8-9", "10-11", "12-13", "14-15"]


def test_stats_emit_what_cluster_metrics_records() -> None:
    seen = []
    stats = EplbStats()
    stats.subscribe(lambda kind, name, value, labels: seen.append((kind, name, value, labels)))
    stats.set_load([0.5, 0.75], [30.0, 10.0])
    stats.add_bytes_moved(0)
    stats.add_bytes_moved(1024)
    stats.record_step(0.01, migrating=True)       # no usual step known yet: no hiccup
    for t in (0.010, 0.012, 0.011):
        stats.record_step(t, migrating=False)
    stats.record_step(0.031, migrating=True)
    stats.add_rebalance(0.25)
    assert seen[:6] == [("set", "tandem_eplb_balancedness", 0.5, {"layer": "0"}),
                        ("set", "tandem_eplb_balancedness", 0.75, {"layer": "1"}),
                        ("set", "tandem_eplb_rank_load", 30.0, {"rank": "0"}),
                        ("set", "tandem_eplb_rank_load_ratio", 1.5, {"rank": "0"}),
                        ("set", "tandem_eplb_rank_load", 10.0, {"rank": "1"}),
                        ("set", "tandem_eplb_rank_load_ratio", 0.5, {"rank": "1"})]
    assert seen[6] == ("inc", "tandem_eplb_bytes_moved_total", 1024.0, {})
    kind, name, hiccup, _ = seen[7]
    assert (kind, name) == ("observe", "tandem_eplb_step_hiccup_seconds") and hiccup == pytest.approx(0.02)
    assert seen[8:] == [("inc", "tandem_eplb_rebalances_total", 1.0, {}),
                        ("observe", "tandem_eplb_rebalance_seconds", 0.25, {})]
    assert stats.bytes_moved_total == 1024 and stats.num_rebalances == 1 and stats.rank_load == [30.0, 10.0]


def test_stats_record_into_cluster_metrics() -> None:
    from prometheus_client import generate_latest

    from cluster.metrics import Metrics
    metrics = Metrics("tiny", "decode")
    stats = EplbStats()
    stats.forward_to(metrics)
    stats.set_load([0.5, 0.9], [12.0, 8.0])
    stats.add_bytes_moved(4096)
    stats.record_step(0.01, migrating=False)
    stats.record_step(0.02, migrating=True)
    stats.add_rebalance(0.3)
    text = generate_latest(metrics.registry).decode()
    assert 'tandem_eplb_balancedness{layer="1",model_name="tiny",pool="decode"} 0.9' in text
    assert 'tandem_eplb_rank_load{model_name="tiny",pool="decode",rank="0"} 12.0' in text
    assert 'tandem_eplb_rank_load_ratio{model_name="tiny",pool="decode",rank="1"} 0.8' in text
    assert 'tandem_eplb_bytes_moved_total{model_name="tiny",pool="decode"} 4096.0' in text
    assert 'tandem_eplb_rebalances_total{model_name="tiny",pool="decode"} 1.0' in text
    assert 'tandem_eplb_rebalance_seconds_count{model_name="tiny",pool="decode"} 1.0' in text
    assert 'tandem_eplb_step_hiccup_seconds_count{model_name="tiny",pool="decode"} 1.0' in text


def test_stats_keep_a_bounded_history_over_a_long_serving_process() -> None:
    """Rebalances and migrating steps for ever: the lists keep the last HISTORY entries,
    the counters count them all."""
    stats = EplbStats()
    stats.record_step(0.01, migrating=False)
    n = 3 * HISTORY
    for i in range(n):
        stats.add_rebalance(float(i))
        stats.record_step(0.01 + i, migrating=True)
    assert len(stats.rebalance_seconds) == len(stats.step_hiccups) == HISTORY
    assert list(stats.rebalance_seconds) == [float(i) for i in range(n - HISTORY, n)]
    assert stats.rebalance_seconds[-1] == n - 1 and stats.step_hiccups[-1] == pytest.approx(n - 1)
    assert stats.num_rebalances == n
