"""Greedy answer generation for a batch of samples."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dexar.adapters.base import VLMAdapter
from dexar.schema import Sample


@dataclass
class GeneratedAnswer:
    """Greedy answer of one sample: token ids without EOS, and the decoded text."""

    ids: list[int]
    text: str


@torch.no_grad()
def generate_answers(
    adapter: VLMAdapter,
    samples: list[Sample],
    max_new_tokens: int = 32,
    keep_eos: bool = False,
) -> list[GeneratedAnswer]:
    """Greedy-decode an answer for each sample (left-padded batch, SDPA attention).

    Args:
        adapter: Adapter of the model.
        samples: Samples whose image and prompt are used.
        max_new_tokens: Generation budget.
        keep_eos: Keep the end-of-sequence token in ``ids`` when generated.

    """
    model = adapter.model
    device = next(model.parameters()).device
    prompt_ids, image_inputs = adapter.encode_prompts([s.image for s in samples], [s.prompt for s in samples])
    batch = adapter.build_batch(prompt_ids, [[] for _ in samples], image_inputs, device=device)
    dtype = next(model.parameters()).dtype
    inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.inputs.items() if k != "position_ids"}
    was_training = model.training
    model.eval()
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    model.train(was_training)
    new = out[:, batch.input_ids.shape[1] :].tolist()
    eos = adapter.tokenizer.eos_token_id
    pad = adapter.tokenizer.pad_token_id
    answers = []
    for row in new:
        ids: list[int] = []
        for t in row:
            if t == eos:
                if keep_eos:
                    ids.append(t)
                break
            if t == pad and pad != eos:
                break
            ids.append(t)
        text = adapter.tokenizer.decode([t for t in ids if t != eos], skip_special_tokens=True).strip()
        answers.append(GeneratedAnswer(ids, text))
    return answers
