"""Training the Shapes model through the CLI is seeded and reproducible; the checkpoint loads back."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from dexar import load_model
from train_eval import main


def _fit(out: Path) -> dict:
    main(
        [
            "fit",
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
    assert model.config.model_type == "llava" and processor.tokenizer.decode([5]) == "user"
