"""Architecture name (config.json `architectures[0]`) -> model class."""

from __future__ import annotations

from engine.models.base import CausalLM
from engine.models.deepseek import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from engine.models.llama import LlamaForCausalLM, Qwen3ForCausalLM
from engine.models.nemotron_h import NemotronHForCausalLM
from engine.models.qwen3_moe import Qwen3MoeForCausalLM

MODELS: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
    "NemotronHForCausalLM": NemotronHForCausalLM,
}


def check_raw_config(raw: dict) -> None:
    """Checks a family runs on config.json's dict before transformers parses it, so a
    bad config fails with an error that names the key and the fix."""
    for arch in raw.get("architectures") or []:
        check = getattr(MODELS.get(arch), "check_raw_config", None)
        if check is not None:
            check(raw)


def model_class(config) -> type[CausalLM]:
    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        if arch in MODELS:
            return MODELS[arch]
    raise ValueError(f"unsupported architecture {archs or '(none in config.json)'}; "
                     f"supported: {', '.join(MODELS)}")
