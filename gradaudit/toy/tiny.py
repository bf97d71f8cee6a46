"""Test-size vision-language models of every supported family, built from configs with processors made
offline (no hub), and random images: what the tests and the capture benchmarks run on. Each builder
returns (model in eval mode, processor or tokenizer)."""

import numpy as np
import torch
from PIL import Image

from gradaudit.toy.models import build_llava
from gradaudit.toy.tokenizers import byte_tokenizer

QWEN2_VL_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                     "<|image_pad|>", "<|video_pad|>")
IDEFICS3_SPECIALS = ("<pad>", "<s>", "</s>", "<image>", "<fake_token_around_image>", "<global-img>",
                     "<end_of_utterance>")


def tiny_llava(seed=0, width=32, blocks=4):
    """(model in eval mode, processor): CLIP-style tower (32-px images, 8-px patches, ``blocks`` blocks, the
    last of which gets no gradient) + Llama-style LM, the shape of :func:`gradaudit.toy.models.build_llava`."""
    shape = dict(width=width, blocks=blocks, vision_blocks=blocks, image=32, patch=8, mlp=2, max_positions=256,
                 special_ids=False)
    model, processor = build_llava(shape, byte_tokenizer(), seed=seed)
    return model.eval(), processor


def random_images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((32 + 4 * i, 40, 3)) * 255).astype("uint8")) for i in range(n)]


def tiny_paligemma(seed=0, width=32, blocks=4):
    """(model in eval mode, processor): SigLIP-style tower (32-px images, 8-px patches) + Gemma-style LM,
    output head tied to the embedding as in PaliGemma."""
    from transformers import (GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor,
                              SiglipImageProcessor, SiglipVisionConfig)

    torch.manual_seed(seed)
    tok = byte_tokenizer()
    vision = SiglipVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=blocks,
                                num_attention_heads=2, image_size=32, patch_size=8)
    text = GemmaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=blocks,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=width // 2, max_position_embeddings=256)
    config = PaliGemmaConfig(vision_config=vision, text_config=text, projection_dim=width,
                             image_token_index=tok.convert_tokens_to_ids("<image>"))
    model = PaliGemmaForConditionalGeneration(config).eval()
    images = SiglipImageProcessor(size={"height": 32, "width": 32})
    images.image_seq_length = (32 // 8) ** 2
    return model, PaliGemmaProcessor(image_processor=images, tokenizer=tok)


def tiny_qwen2_vl(seed=0, width=32, blocks=4):
    """(model in eval mode, processor-like object with image_processor and tokenizer): Qwen2-VL with
    8-px patches merged 2×2, 32–48-px images. Its real processor needs torchvision for videos."""
    from types import SimpleNamespace

    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

    torch.manual_seed(seed)
    tok = byte_tokenizer(QWEN2_VL_SPECIALS, pad="<|endoftext|>", eos="<|im_end|>", bos=None, image=None)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIALS}
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=blocks,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=blocks, embed_dim=width, hidden_size=width, num_heads=2, mlp_ratio=2, patch_size=8,
                           spatial_merge_size=2, temporal_patch_size=2),
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"])
    model = Qwen2VLForConditionalGeneration(config).eval()
    images = Qwen2VLImageProcessor(min_pixels=32 * 32, max_pixels=48 * 48, patch_size=8, merge_size=2,
                                   temporal_patch_size=2)
    return model, SimpleNamespace(image_processor=images, tokenizer=tok)


def tiny_idefics3(seed=0, width=32, blocks=4, smolvlm=False):
    """(model in eval mode, tokenizer): Idefics3 (or SmolVLM) with 32-px images, 8-px patches, pixel
    shuffle 2 (4 image tokens). Its image processor needs torchvision here: see :func:`idefics3_batch`."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, LlamaConfig

    torch.manual_seed(seed)
    tok = byte_tokenizer(IDEFICS3_SPECIALS, image=None)
    pad, image = tok.convert_tokens_to_ids("<pad>"), tok.convert_tokens_to_ids("<image>")
    vision = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=blocks, num_attention_heads=2,
                  image_size=32, patch_size=8)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=blocks,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=False, pad_token_id=pad)
    if smolvlm:
        from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

        config = SmolVLMConfig(vision_config=vision, text_config=text, scale_factor=2, image_token_id=image, pad_token_id=pad)
        return SmolVLMForConditionalGeneration(config).eval(), tok
    config = Idefics3Config(vision_config=vision, text_config=text, scale_factor=2, image_token_id=image, pad_token_id=pad)
    return Idefics3ForConditionalGeneration(config).eval(), tok


def idefics3_batch(tok, pixels, prompts, texts):
    """What Idefics3's processor makes, built by hand: pixels (B, N, 3, 32, 32) are N crops a sample (an
    all-zero crop is padding: that sample has fewer), each crop 4 image tokens in the text."""
    tok.padding_side = "right"
    crop = "<fake_token_around_image><global-img>" + "<image>" * 4
    n_crops = (pixels != 0).flatten(2).any(-1).sum(1).tolist()
    heads = [f"User:{crop * n}<fake_token_around_image>{p}<end_of_utterance>\nAssistant:"
             for n, p in zip(n_crops, prompts)]
    batch = dict(tok([f"{h} {t}</s>" for h, t in zip(heads, texts)], return_tensors="pt", padding=True))
    batch["pixel_values"] = pixels
    batch["pixel_attention_mask"] = torch.ones(*pixels.shape[:2], 32, 32, dtype=torch.bool)
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    for b, h in enumerate(heads):
        labels[b, : len(tok(h)["input_ids"])] = -100
    batch["labels"] = labels
    return batch


def save_llava_folder(root, model_name: str = "model", n_images: int = 0, image_seed: int = 0, seed: int = 0):
    """A saved :func:`tiny_llava` (model and processor in ``root/model_name``) and ``n_images`` random images
    as ``root/img/<i>.png``, for tests that run the capture from files; returns the images."""
    import os

    model, processor = tiny_llava(seed=seed)
    model.save_pretrained(os.path.join(root, model_name))
    processor.save_pretrained(os.path.join(root, model_name))
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    images = random_images(n_images, seed=image_seed)
    for i, im in enumerate(images):
        im.save(os.path.join(root, "img", f"{i}.png"))
    return images
