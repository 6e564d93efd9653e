"""Assessment stage: the projector and the language model learn to answer every assessment question.

Every condition and lesion type the model is trained for has one question (:class:`model.protocol.AssessmentQuestion`)
whose canonical answers are scored by likelihood at inference (:meth:`model.engine.RetinalGPTEngine.assess`). This
stage trains exactly that quantity: for an image and a question, the log-likelihood ℓ_k of each answer k after the
prompt, and the loss

    −log Σ_{k ∈ allowed} softmax(ℓ)_k

where ``allowed`` is the set of answers the image's labels admit — one grade, a range (oct_eye_fundus_mx says only
"NPDR": grades 1–3; "DME present": grades 1–2), or a yes/no. **Partial labels**: a question whose answer the
image's dataset does not label has no allowed set and contributes nothing to the loss (its weight is zero —
never taught as "absent"); every question is asked on its own, in its own conversation, so the set of questions
an image is trained on is invisible to the model and cannot reveal its source dataset. A small next-token loss on
the labelled answer keeps the answers' wording (so ``ask``/``chat`` answer these questions in the same form).

The image tokens come from the frozen, fine-tuned tower (several augmented views per image, one drawn per step).
The computation shares work like the engine: the prompt prefix common to all questions (system message and image)
runs once per image; each question's own tokens and the answers' common start once per (image, question); only the
answers' distinguishing tokens once per answer — all with gradients through the reused key/value caches.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.protocol import ANY_LESION, AssessmentQuestion
from model.schema import LesionType, max_grade
from training.records import Record

IGNORE = -100


def allowed_answers(record: Record, question: AssessmentQuestion) -> frozenset[int] | None:
    """The answers of ``question`` that ``record``'s labels admit, or None when its dataset does not label it."""
    condition = question.condition
    if condition is not None:
        if condition in record.grades:
            return frozenset({record.grades[condition]})
        present = record.present.get(condition)
        if present is None:
            return None
        return frozenset(range(1, max_grade(condition) + 1)) if present else frozenset({0})
    key = question.lesion
    value = record.any_lesion() if key == ANY_LESION else record.lesions.get(LesionType(str(key)))
    return None if value is None else frozenset({int(value)})


def candidate_loss(scores: torch.Tensor, allowed: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean over questions of −log P(allowed answers): ``scores`` ``R×K`` answer log-likelihoods (−inf
    where a question has fewer than K answers), ``allowed`` ``R×K`` bool, ``weight`` ``R`` (0 = unlabelled:
    contributes nothing, whatever its ``allowed`` row says)."""
    total = torch.logsumexp(scores, dim=1)
    admitted = torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), dim=1)
    per_question = (total - admitted).masked_fill(weight == 0, 0.0)
    return (weight * per_question).sum() / weight.sum().clamp(min=1e-9)


@dataclass(frozen=True)
class EncodedQuestion:
    """Token ids of one question's prompts (inference question first, then paraphrases) and its answers."""

    question: AssessmentQuestion
    prompts: tuple[list[int], ...]
    answers: tuple[list[int], ...]
    """Each answer's tokens after the prompt, the separator appended."""
    shared: int
    """Leading answer tokens every answer has in common (scored once per question)."""


def encode_questions(questions: Sequence[AssessmentQuestion], encode: Callable[[str], list[int]],
                     continuation: Callable[[str, str], list[int]], sep_id: int) -> list[EncodedQuestion]:
    """``encode(question)`` gives a prompt's ids (the engine's :meth:`~model.engine.RetinalGPTEngine.encode` of its
    template prompt), ``continuation(question, answer)`` the answer's ids after that prompt — the engine's own
    tokenisation (:meth:`~model.engine.RetinalGPTEngine.continuation`)."""
    out = []
    for question in questions:
        answers = [continuation(question.question, a) for a in question.answers]
        shared = 0
        while all(len(a) > shared + 1 for a in answers) and len({a[shared] for a in answers}) == 1:
            shared += 1
        out.append(EncodedQuestion(question, tuple(encode(q) for q in question.questions),
                                   tuple([*a, sep_id] for a in answers), shared))
    return out


def common_prefix(rows: Sequence[Sequence[int]]) -> int:
    shortest = min(len(r) for r in rows)
    for index in range(shortest):
        if len({r[index] for r in rows}) > 1:
            return index
    return shortest


@dataclass
class AssessmentBatch:
    """One step's questions: rows = (image position in the batch, question index, prompt variant), with the
    allowed answers (bool ``R×K``) and per-row loss weights."""

    images: torch.Tensor
    rows: list[tuple[int, int, int]]
    allowed: torch.Tensor
    weight: torch.Tensor


def make_batch(image_indices: Sequence[int], targets: Sequence[dict[int, frozenset[int]]],
               encoded: Sequence[EncodedQuestion], question_weights: Sequence[float], rng: random.Random,
               paraphrase_rate: float = 0.5) -> AssessmentBatch:
    """Rows for every labelled (image, question) pair of ``image_indices``; ``targets[i]`` maps question index →
    allowed answers of image i (unlabelled questions absent: no row). The inference question is used with
    probability 1 − ``paraphrase_rate``, else a random paraphrase."""
    width = max(len(e.answers) for e in encoded)
    rows, allowed, weight = [], [], []
    for position, image in enumerate(image_indices):
        for q, answers in sorted(targets[image].items()):
            variants = len(encoded[q].prompts)
            variant = 0 if variants == 1 or rng.random() >= paraphrase_rate else rng.randrange(1, variants)
            rows.append((position, q, variant))
            allowed.append([k in answers for k in range(width)])
            weight.append(question_weights[q])
    return AssessmentBatch(torch.tensor(list(image_indices)), rows, torch.tensor(allowed, dtype=torch.bool),
                           torch.tensor(weight, dtype=torch.float32))


def _expand(cache: object, index: torch.Tensor) -> object:
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(layer.keys[index], layer.values[index]) for layer in cache.layers])


def _right_padded(sequences: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, :len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[i, :len(seq)] = 1
    return ids, mask, torch.tensor([len(s) for s in sequences])


def answer_log_likelihoods(model: object, image_tokens: torch.Tensor, batch: AssessmentBatch,
                           encoded: Sequence[EncodedQuestion], image_token_id: int, pad_id: int
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: the answers' log-likelihoods after its prompt (``R×K``, −inf for absent answers, the separator not
    counted, tokens all answers share counted once for all — they cancel in the softmax), the log-likelihood
    of each answer's full text with its separator and that text's token count (``R×K`` each), for the next-token
    loss.

    ``image_tokens``: the tower's selected tokens of the batch's images (``B×T×D``, before the projector)."""
    llava = model.model
    language = llava.language_model
    embed = llava.get_input_embeddings()
    head = model.lm_head
    prompts = [encoded[q].prompts[v] for _, q, v in batch.rows]
    shared = min(common_prefix(prompts), min(len(p) for p in prompts) - 1)
    first = prompts[0][:shared]
    if any(image_token_id in p[shared:] for p in prompts):
        raise ValueError("the image block must lie in the prompt prefix all questions share")
    prefix = torch.tensor([first] * image_tokens.shape[0])
    embeds = embed(prefix)
    slots = prefix == image_token_id
    projected = llava.multi_modal_projector(image_tokens.to(embeds.dtype))
    if bool(slots.any()):
        embeds = embeds.masked_scatter(slots.unsqueeze(-1), projected.to(embeds.dtype))
    positions = torch.arange(shared).expand(len(prefix), shared)
    level1 = language(inputs_embeds=embeds, attention_mask=torch.ones_like(prefix), position_ids=positions,
                      use_cache=True)
    image_of_row = torch.tensor([p for p, _, _ in batch.rows])
    # level 2: each row's own prompt tokens and the answers' common start
    tails = [prompts[r][shared:] + encoded[q].answers[0][:encoded[q].shared] for r, (_, q, _) in enumerate(batch.rows)]
    ids2, mask2, lengths2 = _right_padded(tails, pad_id)
    positions2 = shared + torch.arange(ids2.shape[1]).expand_as(ids2)
    cache = _expand(level1.cache, image_of_row)
    out2 = language(inputs_embeds=embed(ids2), attention_mask=torch.cat([torch.ones(len(tails), shared,
                    dtype=torch.long), mask2], dim=1), position_ids=positions2, cache=cache, use_cache=True)
    logp2 = torch.log_softmax(head(out2.last_hidden_state).float(), dim=-1)
    last = logp2[torch.arange(len(tails)), lengths2 - 1]
    # log-probabilities of the answers' common start (next-token loss only)
    start_ll = torch.zeros(len(tails))
    for r, (_, q, _) in enumerate(batch.rows):
        n = encoded[q].shared
        if n:
            begin = len(prompts[r]) - shared
            targets = torch.tensor(encoded[q].answers[0][:n])
            start_ll[r] = logp2[r, begin - 1:begin - 1 + n].gather(1, targets[:, None]).sum()
    # level 3: the answers' distinguishing tokens
    width = max(len(e.answers) for e in encoded)
    owners, suffixes = [], []
    for r, (_, q, _) in enumerate(batch.rows):
        for answer in encoded[q].answers:
            owners.append(r)
            suffixes.append(answer[encoded[q].shared:])
    owner = torch.tensor(owners)
    ids3, mask3, lengths3 = _right_padded(suffixes, pad_id)
    positions3 = (shared + lengths2[owner])[:, None] + torch.arange(ids3.shape[1])[None, :]
    cache3 = _expand(out2.cache, owner)
    attention3 = torch.cat([torch.ones(len(suffixes), shared, dtype=torch.long), mask2[owner], mask3], dim=1)
    out3 = language(inputs_embeds=embed(ids3), attention_mask=attention3, position_ids=positions3,
                    cache=cache3, use_cache=False)
    logp3 = torch.log_softmax(head(out3.last_hidden_state).float(), dim=-1)
    first_token = last[owner].gather(1, ids3[:, :1]).squeeze(1)
    rest = logp3[:, :-1].gather(2, ids3[:, 1:].unsqueeze(-1)).squeeze(-1)
    position = torch.arange(1, ids3.shape[1])[None, :]
    counted = position < (lengths3[:, None] - 1)       # answer tokens, separator excluded
    with_sep = position < lengths3[:, None]
    answer_ll = first_token + (rest * counted).sum(dim=1)
    full_ll = first_token + (rest * with_sep).sum(dim=1) + start_ll[owner]
    scores = torch.full((len(batch.rows), width), float("-inf"))
    full = torch.full((len(batch.rows), width), float("-inf"))
    tokens = torch.ones((len(batch.rows), width))
    slot = 0
    for r, (_, q, _) in enumerate(batch.rows):
        k = len(encoded[q].answers)
        scores[r, :k] = answer_ll[slot:slot + k]
        full[r, :k] = full_ll[slot:slot + k]
        tokens[r, :k] = torch.tensor([float(len(a)) for a in encoded[q].answers])
        slot += k
    return scores, full, tokens


def assessment_loss(scores: torch.Tensor, full: torch.Tensor, tokens: torch.Tensor, batch: AssessmentBatch,
                    generative_weight: float) -> torch.Tensor:
    """The candidate loss plus ``generative_weight`` × the next-token loss (mean per answer token) of the labelled
    answer, on rows whose labels admit exactly one answer."""
    loss = candidate_loss(scores, batch.allowed, batch.weight)
    single = (batch.allowed.sum(dim=1) == 1) & (batch.weight > 0)
    if generative_weight > 0 and bool(single.any()):
        chosen = batch.allowed[single]
        log_likelihood = full[single].masked_fill(~chosen, 0.0).sum(dim=1)
        count = tokens[single].masked_fill(~chosen, 0.0).sum(dim=1)
        loss = loss - generative_weight * (log_likelihood.sum() / count.sum())
    return loss


def question_weights(targets: Sequence[dict[int, frozenset[int]]], count: int) -> list[float]:
    """1/√(fraction of images labelled) per question, normalised to mean 1 over questions with labels."""
    labelled = [sum(1 for t in targets if q in t) for q in range(count)]
    raw = [1.0 / math.sqrt(n / len(targets)) if n else 0.0 for n in labelled]
    mean = sum(raw) / max(1, sum(1 for r in raw if r))
    return [r / mean if mean else 0.0 for r in raw]
