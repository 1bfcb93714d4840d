"""KV hand-off between engines: the connector base and its backends (NIXL), chosen by
name (engine/kv_transfer.py's hook), the side channel, the block layout both sides
must share, and the decode-side orchestration of a prefill on another engine. No Ray
here: plain processes."""
