"""Model building blocks: norms, rotary, attention, MLA, MLP, MoE and routers."""
