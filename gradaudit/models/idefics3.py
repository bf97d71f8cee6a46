"""Idefics3 and SmolVLM (one architecture): an image split into crops, each crop rows of its sample."""

from __future__ import annotations

import functools

from gradaudit.models.encoding import encode_turns, image_rows
from gradaudit.models.registry import Architecture, register, tower_projector_lm

DOMAINS = tower_projector_lm(r"^model\.vision_model\.encoder\.layers\.(\d+)\.", r"^model\.connector\.",
                             r"^model\.text_model\.layers\.(\d+)\.")
encode = functools.partial(encode_turns, nest_images=True)

register(Architecture("idefics3", DOMAINS, encode, image_rows), Architecture("smolvlm", DOMAINS, encode, image_rows))
