"""KV hand-off between engines: the NIXL connector (engine/kv_transfer.py's hook), its
side channel, the block layout both sides must share, and the decode-side
orchestration of a prefill on another engine. No Ray here: plain processes."""
