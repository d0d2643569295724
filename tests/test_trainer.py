"""Trainer options the command-line tools do not set: Adam's betas and training without checkpoints."""

import pytest
import torch
from conftest import make_vae, random_images
from torch.utils.data import TensorDataset

from dalle_pytorch.training.data_order import IndexedBatches
from dalle_pytorch.training.distributed import DistributedContext
from dalle_pytorch.training.trainer import Trainer, TrainingSettings


def _fit(tmp_path, **settings):
    ctx = DistributedContext()
    data = IndexedBatches(TensorDataset(random_images(8)), batch_size=4, seed=0, ctx=ctx)
    model = make_vae()
    trainer = Trainer(
        model, data, lambda m, batch, step: m(batch[0], return_loss=True),
        TrainingSettings(output_dir=tmp_path, max_steps=3, epochs=2, progress=False, **settings), ctx,
    )  # fmt: skip
    return trainer, trainer.fit()


def test_adam_betas_reach_the_optimizer_and_change_the_update(tmp_path):
    trainer, result = _fit(tmp_path / "a", adam_betas=(0.9, 0.98))
    assert trainer.optimizer.param_groups[0]["betas"] == (0.9, 0.98)
    _, default = _fit(tmp_path / "b")
    weights = [p for p in result.model.parameters() if p.requires_grad]
    others = [p for p in default.model.parameters() if p.requires_grad]
    assert not all(torch.equal(a, b) for a, b in zip(weights, others))
    with pytest.raises(ValueError, match="adam_betas"):
        TrainingSettings(output_dir=tmp_path, adam_betas=(0.9, 1.0))


def test_without_checkpoints_only_the_metrics_are_written(tmp_path):
    _, result = _fit(tmp_path, save_checkpoints=False, save_every_n_steps=1)
    assert result.step == 3 and result.checkpoints == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
