"""LLaVA: a vision tower, a multi-modal projector and a language model under ``model.``."""

from __future__ import annotations

from gradaudit.models.encoding import encode_turns, image_rows
from gradaudit.models.registry import Architecture, register, tower_projector_lm

# weight names of LLaVA-style models (after a PEFT prefix is stripped); PaliGemma shares them
TOWER_PROJECTOR_LM = tower_projector_lm(r"^model\.vision_tower\..*?layers\.(\d+)\.", r"^model\.multi_modal_projector\.",
                                        r"^model\.language_model\.layers\.(\d+)\.")

def vision_reach(config, n_layers: int) -> int:
    """How many vision-encoder blocks feed the projector: LLaVA reads hidden_states[vision_feature_layer]
    (index 0 is the embeddings), so with -2 the last block's output is never used."""
    layer = config.vision_feature_layer
    layer = max(layer) if isinstance(layer, (list, tuple)) else layer
    return layer if layer >= 0 else n_layers + 1 + layer

register(Architecture("llava", TOWER_PROJECTOR_LM, encode_turns,
                      image_rows, vision_reach))
