"""Tiny, randomly initialised VLMs built from config (no model hub) for tests, the demo and benchmarks, saved with
``save_pretrained`` so they load exactly as a hub checkpoint does. Design: docs/design.md#tiny-models."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl", "internvl")


@dataclass(frozen=True)
class SizePreset:
    hidden: int
    intermediate: int
    layers: int
    heads: int  # head_dim = hidden / heads stays >= 32 (vLLM's CPU attention rejects 16)
    kv_heads: int
    vision_hidden: int
    vision_depth: int


SIZES: dict[str, SizePreset] = {
    "micro": SizePreset(64, 128, 2, 2, 1, 32, 1),  # ~0.2M params: per-step overhead dominates
    "tiny": SizePreset(128, 384, 2, 4, 2, 64, 1),  # ~1M params: default for tests and the demo
    "small": SizePreset(512, 1408, 6, 8, 4, 128, 2),  # ~20M params: compute dominates
}

VOCAB_SIZE = 512

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
INTERNVL_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]

# Words that must be single tokens: answers of the synthetic tasks and the reasoning format tags.
TASK_WORDS = ["red", "green", "blue", "yellow", "left", "right", "first", "second", "yes", "no", "one", "two",
              "three", "four", "circle", "square", "triangle", "shape", "colour", "color",
              "<think>", "</think>", "<answer>", "</answer>"] + [str(i) for i in range(10)]

# Chat templates in each family's format (what the hub checkpoints ship), one file each next to this one.
QWEN_CHAT_TEMPLATE, INTERNVL_CHAT_TEMPLATE = (
    (Path(__file__).parent / f"{name}_chat_template.jinja").read_text().rstrip("\n") for name in ("qwen", "internvl"))


_CORPUS = [  # tokenizer training text, with random sentences of its words and the task words
    "What colour is the shape? Answer with one word: red, green, blue or yellow.",
    "How many shapes are in the image? Answer with a number.",
    "Is the shape on the left or on the right?",
    "<think>The shape is red.</think><answer>red</answer>",
    "You are a helpful assistant.",
    "system user assistant",
    "The quick brown fox jumps over the lazy dog. A picture of a circle, a square and a triangle.",
    "Please think step by step and put the final answer in <answer> </answer> tags.",
]


def train_tokenizer(special_tokens: list[str], seed: int = 0):
    """A byte-level BPE with ``VOCAB_SIZE`` entries; the specials get ids 0..len-1 in order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = [w for w in TASK_WORDS if w.startswith("<")]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - len(words), special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    rng, vocab = random.Random(seed), TASK_WORDS + _CORPUS[0].split() + _CORPUS[6].split()
    # Frequent words become single tokens; repeat the task words (with the leading space variant).
    corpus = (_CORPUS + [" ".join(rng.choices(vocab, k=rng.randint(3, 12))) for _ in range(400)]
              + [" ".join(TASK_WORDS)] * 200 + [" " + " ".join(TASK_WORDS)] * 200)
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_tokens(words)  # the format tags: one token each
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None, additional_special_tokens=special_tokens[1:],
                                   model_max_length=4096)


def _qwen_text_kwargs(p: SizePreset, tok) -> dict[str, Any]:
    return dict(vocab_size=VOCAB_SIZE, hidden_size=p.hidden, intermediate_size=p.intermediate,
                num_hidden_layers=p.layers, num_attention_heads=p.heads, num_key_value_heads=p.kv_heads,
                max_position_embeddings=4096, bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tok.pad_token_id, tie_word_embeddings=False)


def _build_qwen(family: str, p: SizePreset, seed: int):
    import transformers as tf
    tok = train_tokenizer(QWEN_SPECIAL, seed)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    head_dim, patch, merge = p.hidden // p.heads, 16 if family == "qwen3-vl" else 14, 2
    mrope = [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]  # sums to head_dim / 2
    text = {**_qwen_text_kwargs(p, tok), "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                              "mrope_section": mrope}}
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    vision = dict(num_heads=2, patch_size=patch, spatial_merge_size=merge, temporal_patch_size=2)
    if family == "qwen2-vl":
        vision.update(depth=p.vision_depth, embed_dim=p.vision_hidden, hidden_size=p.hidden, mlp_ratio=2)
        cfg_cls, model_cls, proc_cls = tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLProcessor
    else:
        vision.update(hidden_size=p.vision_hidden, out_hidden_size=p.hidden, intermediate_size=2 * p.vision_hidden)
    if family == "qwen2.5-vl":
        vision.update(depth=p.vision_depth + 1, window_size=56, fullatt_block_indexes=[p.vision_depth])
        cfg_cls, model_cls, proc_cls = (tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration,
                                        tf.Qwen2_5_VLProcessor)
    elif family == "qwen3-vl":
        text.update(head_dim=head_dim, rope_parameters={**text["rope_parameters"], "mrope_interleaved": True})
        vision.update(depth=p.vision_depth, num_position_embeddings=64, deepstack_visual_indexes=[0])
        cfg_cls, model_cls, proc_cls = tf.Qwen3VLConfig, tf.Qwen3VLForConditionalGeneration, tf.Qwen3VLProcessor
    cfg = cfg_cls(text_config=text, vision_config=vision, **tokens)
    # Small images keep tests fast: at most 16x16 merged tokens, at least one.
    size = {"shortest_edge": (patch * merge) ** 2, "longest_edge": (patch * merge) ** 2 * 16}  # pixels
    image_processor = tf.Qwen2VLImageProcessor(patch_size=patch, merge_size=merge, temporal_patch_size=2, size=size)
    video_cls = tf.Qwen3VLVideoProcessor if family == "qwen3-vl" else tf.Qwen2VLVideoProcessor
    video_processor = video_cls(patch_size=patch, merge_size=merge, temporal_patch_size=2, size=dict(size))
    processor = proc_cls(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                         chat_template=QWEN_CHAT_TEMPLATE)
    return cfg, model_cls, processor


def _build_internvl(p: SizePreset, seed: int):
    """InternVL's processor reads ``tokenizer.start_image_token`` etc.: named extra special tokens of a
    rebuilt tokenizer, so that they survive ``save_pretrained``."""
    import transformers as tf
    tok = train_tokenizer(INTERNVL_SPECIAL, seed)
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token=tok.eos_token,
                                     pad_token=tok.pad_token, model_max_length=tok.model_max_length,
                                     extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                                                           "context_image_token": "<IMG_CONTEXT>",
                                                           "video_token": "<video>"})
    image_size, patch = 56, 14
    seq_len = int((image_size // patch) ** 2 * 0.5**2)  # 4 tokens per tile
    text = {**_qwen_text_kwargs(p, tok), "model_type": "qwen2", "head_dim": p.hidden // p.heads,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}
    vision = dict(hidden_size=p.vision_hidden, num_hidden_layers=p.vision_depth, num_attention_heads=2,
                  intermediate_size=2 * p.vision_hidden, image_size=[image_size, image_size],
                  patch_size=[patch, patch])
    cfg = tf.InternVLConfig(vision_config=vision, text_config=text, image_seq_length=seq_len,
                            image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), downsample_ratio=0.5)
    image_processor = tf.GotOcr2ImageProcessor(size={"height": image_size, "width": image_size},
                                               crop_to_patches=True, min_patches=1, max_patches=4)
    video_processor = tf.InternVLVideoProcessor(size={"height": image_size, "width": image_size})
    processor = tf.InternVLProcessor(image_processor=image_processor, tokenizer=tok,
                                     video_processor=video_processor, image_seq_length=seq_len,
                                     chat_template=INTERNVL_CHAT_TEMPLATE)
    return cfg, tf.InternVLForConditionalGeneration, processor


def build_tiny_model(family: str, out_dir: str | Path, seed: int = 0, size: str = "tiny", tied: bool = False) -> Path:
    """Build, seed and save a tiny ``family`` model with its processor into ``out_dir`` (returned), deterministic
    in (family, seed, size, tied); ``tied``: lm_head shares the input embeddings, as in Qwen2.5-VL-3B."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if family == "internvl":
        cfg, model_cls, processor = _build_internvl(SIZES[size], seed)
    else:
        cfg, model_cls, processor = _build_qwen(family, SIZES[size], seed)
    cfg.tie_word_embeddings = cfg.get_text_config().tie_word_embeddings = tied
    torch.manual_seed(seed)
    model = model_cls(cfg)
    model.generation_config.update(eos_token_id=cfg.get_text_config().eos_token_id,
                                   pad_token_id=processor.tokenizer.pad_token_id, bos_token_id=None)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    meta = {"family": family, "size": size, "seed": seed, "tied": tied,
            "num_parameters": sum(t.numel() for t in model.parameters())}
    (out / "vlgrpo_tiny.json").write_text(json.dumps(meta, indent=2))
    return out


def warm_up_format(model_dir: str | Path, module, conversations: Sequence[list[dict[str, Any]]],
                   images: Sequence[Sequence[Image.Image]], answers: Sequence[str], steps: int = 100,
                   batch_size: int = 16, lr: float = 1e-3, seed: int = 0) -> float:
    """Teach a freshly built tiny model the answer *format*, not the task: reply with one answer of the data and
    stop. Each prompt (a chat conversation and its images) is trained on a random row's answer, so it learns the
    answers' marginal, independent of the image: accuracy stays at chance and GRPO has to teach it to look (a
    real run starts from an instruction-tuned model that answers in format). Saves in place; returns the last loss."""
    processor = module.get_processing_class().from_pretrained(model_dir)
    prompts = module.prepare_prompt(processor, [{"prompt": c} for c in conversations])
    model = module.get_model_class(str(model_dir), {}).from_pretrained(model_dir, dtype=torch.float32)
    eos = module.tokenizer(processor).eos_token
    rng, opt = random.Random(seed), torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        rows = [rng.randrange(len(prompts)) for _ in range(batch_size)]
        targets = [rng.choice(answers) + eos for _ in rows]
        x = module.prepare_model_inputs(processor, [prompts[i] + t for i, t in zip(rows, targets)],
                                        [images[i] for i in rows], padding_side="right")
        ids, mask = x["input_ids"], x["attention_mask"]
        labels = torch.full_like(ids, -100)
        for r, t in enumerate(targets):  # only the answer tokens (and EOS) are trained
            end, n = int(mask[r].sum()), len(module.tokenizer(processor)(t, add_special_tokens=False)["input_ids"])
            labels[r, end - n:end] = ids[r, end - n:end]
        logits = model(**x).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(model_dir)
    return loss.item()
