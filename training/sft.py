"""Supervised fine-tuning pieces: LLaVA JSON conversations → token ids with loss masks, and the LLaVA forward
pass on precomputed vision features.

Tokenisation follows the runtime exactly: the conversation template's segments
(:meth:`model.protocol.ConversationTemplate.segments`), ``<s>`` first, the image placeholder expanded to the
model's image-token count, each assistant answer (``" {answer}###"``) tokenised on its own as the engine scores
continuations. Only answer tokens carry loss (labels of every other token are −100).

While the vision tower is frozen (stages 1 and 2), its selected hidden states do not change, so they are computed
once per image and the projector + language model train on them: the same function as
``LlavaForConditionalGeneration.forward`` (projector, placeholder scatter, language model, LM head) without
re-running the tower every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from model.protocol import ConversationTemplate

IGNORE = -100


@dataclass(frozen=True)
class Example:
    """One tokenised conversation about image ``image_index``."""

    input_ids: list[int]
    labels: list[int]
    image_index: int


def turns_of(item: dict[str, Any]) -> list[tuple[str, str]]:
    """(question, answer) pairs of a LLaVA JSON item, the image placeholder removed from the first question."""
    messages = item["conversations"]
    pairs = []
    for human, gpt in zip(messages[0::2], messages[1::2], strict=True):
        if human["from"] != "human" or gpt["from"] != "gpt":
            raise ValueError(f"item {item.get('id')}: conversations must alternate human/gpt")
        question = human["value"].replace("<image>\n", "").replace("<image>", "").strip()
        pairs.append((question, gpt["value"]))
    return pairs


def tokenize(item: dict[str, Any], image_index: int, tokenizer: Any, template: ConversationTemplate,
             image_token_id: int, image_tokens: int, max_length: int) -> Example:
    """Token ids and labels of one conversation (truncated to ``max_length``, keeping the image block)."""
    ids: list[int] = [tokenizer.bos_token_id]
    labels: list[int] = [IGNORE]
    for text, is_target in template.segments(turns_of(item)):
        piece = tokenizer(text, add_special_tokens=False).input_ids
        expanded: list[int] = []
        for token in piece:
            expanded += [token] * image_tokens if token == image_token_id else [token]
        ids += expanded
        labels += expanded if is_target else [IGNORE] * len(expanded)
    return Example(ids[:max_length], labels[:max_length], image_index)


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids``, ``attention_mask``, ``labels``, ``image_index``."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "image_index": torch.tensor([e.image_index for e in examples])}


def llava_loss(model: Any, batch: dict[str, torch.Tensor], vision_features: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens. ``vision_features`` are the tower's selected hidden
    states of every image (``images × tokens × width``), indexed by ``batch["image_index"]``."""
    llava = model.model
    input_ids = batch["input_ids"]
    embeds = llava.get_input_embeddings()(input_ids)
    image_mask = input_ids == model.config.image_token_index
    if image_mask.any():
        features = vision_features[batch["image_index"]].to(embeds.device, embeds.dtype)
        projected = llava.multi_modal_projector(features).to(embeds.dtype)
        embeds = embeds.masked_scatter(image_mask.unsqueeze(-1).expand_as(embeds), projected)
    hidden = llava.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
    target = batch["labels"][:, 1:]
    scored = target != IGNORE
    logits = model.lm_head(hidden[:, :-1][scored]).float()
    return torch.nn.functional.cross_entropy(logits, target[scored])
