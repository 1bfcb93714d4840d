"""Tuned MoE tile configs: the shipped data files are well-formed, and a call takes the
entry of the nearest token count for its (experts, intermediate size, device)."""

from __future__ import annotations

import json

import torch

from engine.kernels import moe_configs
from engine.kernels.moe import MoEConfig, config_entry, default_config, moe_config

FIELDS = {"BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "num_warps", "num_stages"}
WALK_FIELDS = {"GROUP_SIZE_M", "persistent", "flatten", "tma", "BLOCK_SIZE_N_DOWN"}      # optional: default the plain walk


def test_shipped_files_are_well_formed():
    for path in moe_configs.CONFIG_DIR.glob("*.json"):
        assert path.name.startswith("E=") and ",N=" in path.name and ",device_name=" in path.name
        table = json.loads(path.read_text())
        assert table, path.name
        for m, cfg in table.items():
            assert int(m) > 0 and FIELDS <= set(cfg) <= FIELDS | WALK_FIELDS, (path.name, m)
            for key in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "num_warps"):
                assert cfg[key] >= 4 and cfg[key] & (cfg[key] - 1) == 0, (path.name, m, key)


def test_nearest_token_count_of_the_matching_file(tmp_path, monkeypatch):
    name = moe_configs.config_file_name(8, 32, "Some GPU")
    assert name == "E=8,N=32,device_name=Some_GPU.json"
    (tmp_path / name).write_text(json.dumps({
        "1": dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=32, BLOCK_SIZE_K=64, num_warps=4, num_stages=3),
        "256": dict(BLOCK_SIZE_M=64, BLOCK_SIZE_N=128, BLOCK_SIZE_K=64, num_warps=8, num_stages=4),
        "4096": config_entry(MoEConfig(128, 128, 64, 8, 3, group_m=8, persistent=1, flatten=True, tma=True,
                                          down_block_n=256))}))
    monkeypatch.setattr(moe_configs, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(moe_configs, "device_name", lambda device: "Some GPU")
    moe_configs.load.cache_clear()
    try:
        dev = torch.device("cpu")
        assert moe_config(2, 2, 8, 32, dev) == MoEConfig(16, 32, 64, 4, 3)
        assert moe_config(200, 2, 8, 32, dev) == MoEConfig(64, 128, 64, 8, 4)
        assert moe_config(5000, 2, 8, 32, dev) == MoEConfig(128, 128, 64, 8, 3, 8, 1, True, True, 256)
        # Far from every key (over 2x): the heuristic.
        assert moe_config(3, 2, 8, 32, dev) == default_config(6, 8)
        assert moe_config(600, 2, 8, 32, dev) == default_config(1200, 8)
        assert moe_config(1500, 2, 8, 32, dev) == default_config(3000, 8)
        # Another shape has no file: the heuristic.
        assert moe_config(200, 2, 16, 32, dev) == default_config(400, 16)
    finally:
        moe_configs.load.cache_clear()
