"""Training the Shapes model through the CLI is seeded and reproducible; the checkpoint loads back."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file
from transformers import LlamaTokenizerFast

from datamodules.shapes import make_shapes_sample
from dexar import load_model
from dexar.pipeline.fit import ShapesFitModule
from dexar.shapes.tokenizer import train_shapes_tokenizer
from train_eval import main


def _fit(out: Path) -> dict:
    main(
        [
            "fit",
            "--trainer.devices=1",  # in this process: fit.yaml's DDP would relaunch the command (pytest)
            "--trainer.strategy=auto",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={out}",
            f"--trainer.logger.init_args.save_dir={out}",
            "--trainer.enable_checkpointing=false",
            "--data.init_args.batch_size=4",
            "--data.init_args.val_samples=4",
            f"--model.init_args.output_dir={out / 'ckpt'}",
        ]
    )
    return load_file(str(out / "ckpt" / "model.safetensors"))


def test_fit_is_reproducible_and_checkpoint_loads(tmp_path):
    first, second = _fit(tmp_path / "a"), _fit(tmp_path / "b")
    assert first.keys() == second.keys()
    assert all((first[k] == second[k]).all() for k in first)
    model, processor = load_model(tmp_path / "a" / "ckpt")
    assert model.config.model_type == "llava"
    assert LlamaTokenizerFast.from_pretrained(tmp_path / "a" / "ckpt").get_vocab() == processor.tokenizer.get_vocab()
    assert processor.tokenizer.get_vocab() == train_shapes_tokenizer().get_vocab()
    assert model.config.text_config.vocab_size == len(processor.tokenizer)


def test_training_targets_are_the_answer_pieces_then_eos():
    module = ShapesFitModule()
    samples = [make_shapes_sample(i, "train", task="mixed") for i in range(12)]
    assert {s.meta["task"] for s in samples} == {"caption", "question"}
    tf, targets = module.teacher_forced(samples)
    tokenizer = module.processor.tokenizer
    for b, sample in enumerate(samples):
        learned = targets[b][targets[b] != -100].tolist()
        assert learned == module.adapter.tokenize_answer(sample.answer) + [tokenizer.eos_token_id]
        assert tokenizer.convert_ids_to_tokens(learned[0]).startswith("▁"), "the answer's leading space"
        assert tokenizer.decode(learned, skip_special_tokens=True) == sample.answer
        # the targets are the next tokens of the sequence, and the one before the answer ends the prompt
        first = targets.shape[1] - len(learned)
        assert tf.input_ids[b, first + 1 :].tolist() == learned
        assert tokenizer.decode(tf.input_ids[b, : first + 1]).endswith("ASSISTANT:")
