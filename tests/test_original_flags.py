"""Flags and import paths of the original DALLE-pytorch keep working or name their replacement."""

from __future__ import annotations

import argparse

import pytest

import dalle_pytorch
from dalle_pytorch.cli import common, train_clip, train_dalle, train_vae


@pytest.mark.parametrize("module", [train_vae, train_dalle, train_clip])
def test_amp_and_the_deepspeed_backend_keep_working(module):
    parser = module.build_parser()
    required = ["--image_folder", "x"] if module is train_vae else ["--image_text_folder", "x"]
    assert parser.parse_args([*required, "--amp"]).precision == "fp16"
    assert parser.parse_args([*required, "--distributed_backend", "deepspeed"]).deepspeed is True
    assert parser.parse_args([*required, "--distr_backend", "dummy"]).deepspeed is False


@pytest.mark.parametrize(
    "flags, replacement",
    [
        (["--lr_decay"], "use --lr_schedule exponential with --lr_decay_rate/--lr_decay_every"),
        (["--flops_profiler"], '--deepspeed_config FILE holding {"flops_profiler"'),
        (["--distributed_backend", "horovod"], "Horovod is not supported; launch several processes with torchrun"),
    ],
)
def test_retired_flags_stop_with_their_replacement(flags, replacement, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_dalle.main(["--image_text_folder", "x", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"dalle-train: error: {flags[0]}" in err and replacement in err


def test_taming_flags_choose_the_vqgan_files(monkeypatch, tmp_path):
    chosen = []

    class FakeVQGan:
        def __init__(self, model_path, config_path):
            chosen.append((model_path, config_path))

    monkeypatch.setattr("dalle_pytorch.image_tokenizers.pretrained_vae.VQGanVAE", FakeVQGan)
    args = train_dalle.build_parser().parse_args(
        ["--image_text_folder", "x", "--taming", "--vqgan_model_path", "m.ckpt", "--vqgan_config_path", "m.yaml"]
    )
    assert isinstance(common.load_vae(args), FakeVQGan) and chosen == [("m.ckpt", "m.yaml")]


def test_the_original_import_paths_keep_their_public_names():
    from dalle_pytorch.dalle_pytorch import CLIP, DALLE, DiscreteVAE, OpenAIDiscreteVAE, VQGanVAE

    assert (CLIP, DALLE, DiscreteVAE) == (dalle_pytorch.CLIP, dalle_pytorch.DALLE, dalle_pytorch.DiscreteVAE)
    assert (OpenAIDiscreteVAE, VQGanVAE) == (dalle_pytorch.OpenAIDiscreteVAE, dalle_pytorch.VQGanVAE)
    import dalle_pytorch.dalle_pytorch as old_models

    with pytest.raises(AttributeError, match="dalle_pytorch.models.sampling"):
        old_models.top_k  # noqa: B018


def test_distributed_utils_answers_for_one_process():
    from dalle_pytorch import distributed_utils

    parser = distributed_utils.wrap_arg_parser(argparse.ArgumentParser())
    backend = distributed_utils.set_backend_from_args(parser.parse_args([]))
    assert distributed_utils.using_backend("dummy") and not distributed_utils.using_backend("deepspeed")
    assert distributed_utils.is_distributed is False
    assert (backend.get_world_size(), backend.get_rank(), backend.is_root_worker()) == (1, 0, True)
    with pytest.raises(NotImplementedError, match="dalle_pytorch.training.trainer.Trainer"):
        backend.distribute(args=None, model=None)
    with pytest.raises(ValueError, match="Horovod is not supported"):
        distributed_utils.set_backend_from_args(parser.parse_args(["--distributed_backend", "horovod"]))
    assert distributed_utils.using_backend(distributed_utils.set_backend_from_args(
        parser.parse_args(["--deepspeed"])))  # fmt: skip
