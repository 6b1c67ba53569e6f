"""Training of the bundled Shapes model (``python train_eval.py fit --config configs/shapes/fit.yaml``)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from dexar.adapters import TeacherForcedBatch, get_adapter
from dexar.generation import generate_answers
from dexar.schema import Sample
from dexar.shapes.model import SHAPES_CHECKPOINT, build_shapes_model
from dexar.shapes.tokenizer import build_shapes_processor


class ShapesFitModule(L.LightningModule):
    """Trains a fresh Shapes LLaVA on answer tokens (+ EOS) with AdamW, warmup and cosine decay.

    Args:
        lr: Peak learning rate.
        betas: AdamW betas.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warmup steps.
        total_steps: Steps of the cosine schedule (set it to the trainer's ``max_steps``).
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        init_seed: Seed of the weight initialisation.
        output_dir: Where the trained HF checkpoint is saved at the end of ``fit``.
        max_new_tokens: Generation budget for validation exact match.
        text_layers: Decoder layers of the language model.

    """

    def __init__(
        self,
        lr: float = 1.2e-3,
        betas: tuple[float, float] = (0.9, 0.98),
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        total_steps: int = 6000,
        min_lr_ratio: float = 0.03,
        init_seed: int = 0,
        output_dir: str = SHAPES_CHECKPOINT,
        max_new_tokens: int = 32,
        text_layers: int = 3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.processor = build_shapes_processor()
        self.model = build_shapes_model(self.processor, seed=init_seed, text_layers=text_layers)
        self.adapter = get_adapter(self.model, self.processor)
        self._val_hits: list[float] = []

    def teacher_forced(self, batch: list[Sample]) -> tuple[TeacherForcedBatch, torch.Tensor]:
        """The LLaVA-1.5 training sequence of each sample and its next-token targets.

        The answer follows ``ASSISTANT:`` as the adapter tokenizes it (with its leading space, ``▁i``
        ``▁see`` ...) and ends in ``</s>``. ``targets[b, j]`` is the token after position ``j``, or -100
        (ignored) where that token belongs to the prompt or padding: only answer tokens are learned.
        """
        eos = self.processor.tokenizer.eos_token_id
        prompt_ids, image_inputs = self.adapter.encode_prompts([s.image for s in batch], [s.prompt for s in batch])
        answers = [self.adapter.tokenize_answer(s.answer or "") + [eos] for s in batch]
        tf = self.adapter.build_batch(prompt_ids, answers, image_inputs, device=self.device)
        targets = tf.input_ids[:, 1:].clone()
        n = targets.shape[1]
        positions = torch.arange(n, device=self.device)
        first = n - tf.answer_lengths.to(self.device)
        targets[positions[None, :] < first[:, None]] = -100
        return tf, targets

    def training_step(self, batch: list[Sample], batch_idx: int) -> torch.Tensor:
        tf, targets = self.teacher_forced(batch)
        logits = self.model(**tf.inputs).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        return loss

    def validation_step(self, batch: list[Sample], batch_idx: int) -> None:
        answers = generate_answers(self.adapter, batch, max_new_tokens=self.hparams.max_new_tokens)
        self._val_hits += [float(a.text == s.answer) for a, s in zip(answers, batch, strict=True)]

    def on_validation_epoch_end(self) -> None:
        if self._val_hits:
            acc = sum(self._val_hits) / len(self._val_hits)
            self.log("val/exact_match", acc, prog_bar=True, sync_dist=True)
        self._val_hits = []

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )

        def schedule(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            progress = min(1.0, (step - hp.warmup_steps) / max(1, hp.total_steps - hp.warmup_steps))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero:
            self.save_checkpoint_dir(self.hparams.output_dir)

    def save_checkpoint_dir(self, path: str | Path) -> None:
        """Save model (safetensors) and processor as an HF directory."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        build_shapes_processor().save_pretrained(path)  # as built: no padding state left by training batches
