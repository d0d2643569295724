"""Checkpoints written by the original DALLE-pytorch 1.6.6 (tests/fixtures/original, made by make_fixtures.py
there) convert to model folders with the original's outputs; what cannot be equal is refused clearly."""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dalle_pytorch import DALLE, DiscreteVAE
from dalle_pytorch.cli import convert, generate, train_dalle
from dalle_pytorch.cli.common import load_vae
from dalle_pytorch.convert.original import convert_original, load_original
from dalle_pytorch.io.checkpoint import CheckpointError

FIXTURES = Path(__file__).parent / "fixtures" / "original"
# every attention kind but DeepSpeed's sparse, reversible, stable, token shift and rotary embeddings
EQUAL = ["full", "axial", "reversible", "stable", "conv_like", "shift_rotary", "rotary_axial", "uneven_reversible"]


def original_logits(name: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    expected = load_file(str(FIXTURES / f"{name}.expected.safetensors"))
    return expected, expected["logits"]


def assert_same_logits(dalle: DALLE, name: str) -> None:
    expected, reference = original_logits(name)
    with torch.no_grad():
        logits = dalle(expected["text"].clone(), expected["codes"])
    allowed = reference > torch.finfo(reference.dtype).min / 2  # the original masks with -max, we with -inf
    assert torch.equal(torch.isfinite(logits), allowed)
    torch.testing.assert_close(logits[allowed], reference[allowed], rtol=1e-5, atol=1e-5)


def test_a_vae_pt_converts_to_equal_codes_and_images(tmp_path):
    expected = load_file(str(FIXTURES / "vae.expected.safetensors"))
    folder = convert_original(FIXTURES / "vae.pt", tmp_path / "vae")
    vae = DiscreteVAE.from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(vae.get_codebook_indices(expected["images"]), expected["codebook_indices"])
        # the original's decode stays in the normalized range; ours maps back to [0, 1]
        torch.testing.assert_close(vae.decode(expected["codes"]), expected["decoded"] * 0.5 + 0.5)


def test_a_vae_without_residual_blocks_converts_when_codebook_and_hidden_dims_match(tmp_path):
    expected = load_file(str(FIXTURES / "vae_plain.expected.safetensors"))
    vae = load_original(FIXTURES / "vae_plain.pt")
    with torch.no_grad():
        assert torch.equal(vae.get_codebook_indices(expected["images"]), expected["codebook_indices"])
        torch.testing.assert_close(vae.decode(expected["codes"]), expected["decoded"] * 0.5 + 0.5)
    saved = torch.load(FIXTURES / "vae_plain.pt", weights_only=True)
    saved["hparams"]["hidden_dim"] = 8
    torch.save(saved, tmp_path / "vae.pt")
    with pytest.raises(CheckpointError, match=r"codebook_dim \(4\) differs from hidden_dim \(8\)"):
        load_original(tmp_path / "vae.pt")


@pytest.mark.parametrize("name", EQUAL)
def test_a_dalle_pt_converts_to_equal_logits(name, tmp_path):
    folder = convert_original(FIXTURES / f"{name}.dalle.pt", tmp_path / name)
    dalle = DALLE.from_pretrained(folder)
    assert_same_logits(dalle, name)
    hparams = load_original(FIXTURES / f"{name}.dalle.pt").config
    saved = torch.load(FIXTURES / f"{name}.dalle.pt", weights_only=True)["hparams"]
    assert dalle.config == hparams and dalle.config["dim"] == saved["dim"]


def test_the_original_variants_are_chosen_and_the_converted_model_decodes_with_its_cache(tmp_path):
    dalle = DALLE.from_pretrained(convert_original(FIXTURES / "uneven_reversible.dalle.pt", tmp_path / "model"))
    config = json.loads((tmp_path / "model" / "config.json").read_text())["config"]
    assert config["attn_types"] == ["conv_like_corner", "axial_col"] and config["dim"] == 10
    assert config["shift_tokens"] and config["shift_tokens_style"] == "original"
    assert config["rotary_emb"] and config["rotary_emb_style"] == "original"
    plain = load_original(FIXTURES / "full.dalle.pt").config  # options that are off keep this library's styles
    assert not plain["shift_tokens"] and plain["shift_tokens_style"] == "default"
    text = original_logits("uneven_reversible")[0]["text"]
    codes = [dalle.generate_image_codes(text, use_cache=cache, generator=torch.Generator().manual_seed(0))
             for cache in (True, False)]  # fmt: skip
    assert torch.equal(*codes)


def test_rotary_angles_of_another_kind_in_the_file_are_refused(tmp_path):
    saved = torch.load(FIXTURES / "shift_rotary.dalle.pt", weights_only=True)
    saved["weights"]["transformer.pos_emb"][..., :4] *= 2  # text frequencies that are not 1.6.6's
    torch.save(saved, tmp_path / "dalle.pt")
    with pytest.raises(CheckpointError, match="rotary angles stored in the file.*differ"):
        load_original(tmp_path / "dalle.pt")


@pytest.mark.parametrize(
    "name, change, options",
    [
        ("shared_emb", {}, "share_input_output_emb"),
        ("full", dict(attn_types=("full", "sparse")), "sparse"),
        ("full", dict(sparse_attn=True, attn_types=None), "sparse"),
        ("full", dict(shared_attn_ids=(0, 0)), "shared_ids"),
    ],
)
def test_options_that_compute_a_different_function_are_refused_with_the_reason(name, change, options, tmp_path):
    saved = torch.load(FIXTURES / f"{name}.dalle.pt", weights_only=True)
    saved["hparams"].update(change)
    torch.save(saved, tmp_path / "dalle.pt")
    with pytest.raises(CheckpointError, match=rf"cannot be converted to an equal model \({options}\)"):
        load_original(tmp_path / "dalle.pt")


def test_shared_input_output_embeddings_convert_when_the_output_bias_is_zero(tmp_path):
    saved = torch.load(FIXTURES / "shared_emb.dalle.pt", weights_only=True)
    bias = saved["weights"]["to_logits.1.bias"].clone()
    saved["weights"]["to_logits.1.bias"].zero_()
    torch.save(saved, tmp_path / "dalle.pt")
    dalle = load_original(tmp_path / "dalle.pt")
    assert dalle.config["share_input_output_emb"]
    expected, reference = original_logits("shared_emb")
    allowed = reference > torch.finfo(reference.dtype).min / 2
    with torch.no_grad():
        logits = dalle(expected["text"].clone(), expected["codes"])
    unbiased = (reference - bias)[allowed]  # the original's logits without the bias that was zeroed
    torch.testing.assert_close(logits[allowed], unbiased, rtol=1e-5, atol=1e-5)


def test_reading_runs_no_code_from_the_file(tmp_path, monkeypatch):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('code ran')",))

    saved = torch.load(FIXTURES / "vae.pt", weights_only=True)
    saved["evil"] = Boom()
    path = tmp_path / "evil.pt"
    torch.save(saved, path)
    vae = load_original(path)  # the unknown object stays an inert record
    assert isinstance(vae, DiscreteVAE)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_a_deepspeed_checkpoint_folder_is_read(tmp_path):
    """The layout the original's train_dalle.py writes under DeepSpeed with ZeRO >= 2: dalle.pt holds a note
    instead of weights, NAME-ds-cp/ holds DeepSpeed's files (weights in fp16 under 'module')."""
    saved = torch.load(FIXTURES / "full.dalle.pt", weights_only=True)
    weights = saved.pop("weights")
    folder = tmp_path / "dalle-ds-cp"
    (folder / "global_step7").mkdir(parents=True)
    (folder / "latest").write_text("global_step7")
    torch.save({"module": {k: v.half() for k, v in weights.items()}, "optimizer": None, "ds_version": "0.5"},
               folder / "global_step7" / "mp_rank_00_model_states.pt")  # fmt: skip
    torch.save({**saved, "weights": "To get a working standard checkpoint, look into consolidating DeepSpeed "
                "checkpoints."}, tmp_path / "dalle.pt")  # fmt: skip
    torch.save(saved, folder / "auxiliary.pt")
    for source in (tmp_path / "dalle.pt", folder):
        dalle = load_original(source)
        reference = DALLE.from_pretrained(convert_original(FIXTURES / "full.dalle.pt", tmp_path / "ref"))
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(dalle.state_dict()[key], value, rtol=1e-3, atol=1e-3)  # fp16 weights
    (folder / "latest").unlink()
    with pytest.raises(CheckpointError, match="saved by DeepSpeed"):
        load_original(tmp_path / "dalle.pt")


def test_dalle_convert_cli_and_the_tools_take_the_file_directly(tmp_path, capsys):
    out = tmp_path / "model"
    convert.main([str(FIXTURES / "full.dalle.pt"), str(out)])
    assert f"wrote DALLE to {out}" in capsys.readouterr().out
    assert_same_logits(DALLE.from_pretrained(out), "full")
    with pytest.raises(SystemExit) as exit_info:  # never over a folder with something in it
        convert.main([str(FIXTURES / "full.dalle.pt"), str(out)])
    assert exit_info.value.code == 2 and "is not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert.main([str(FIXTURES / "shared_emb.dalle.pt"), str(tmp_path / "refused")])
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot be converted to an equal model (share_input_output_emb)" in err

    # dalle-generate with the original's dalle.pt as --dalle_path: same images as with the converted folder
    prompt = ["--text", "x", "--num_images", "2", "--device", "cpu", "--bpe_path", str(write_vocab(tmp_path))]
    generate.main(["--dalle_path", str(FIXTURES / "full.dalle.pt"), *prompt, "--outputs_dir", str(tmp_path / "a")])
    generate.main(["--dalle_path", str(out), *prompt, "--outputs_dir", str(tmp_path / "b")])
    assert "converted in memory" in capsys.readouterr().err
    for name in ("0.png", "1.png"):
        assert (tmp_path / "a" / "x" / name).read_bytes() == (tmp_path / "b" / "x" / name).read_bytes()

    # dalle-train fine-tunes from it (a new run; the optimizer state of the file is not used)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (40 * i, 80, 120)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("x x")
    run = tmp_path / "run"
    train_dalle.main(["--image_text_folder", str(data), "--dalle_path", str(FIXTURES / "full.dalle.pt"),
                      "--bpe_path", str(write_vocab(tmp_path)), "--truncate_captions", "--batch_size", "2",
                      "--output_dir", str(run), "--max_steps", "1", "--no_progress", "--device", "cpu"])  # fmt: skip
    assert DALLE.from_pretrained(run / "step-00000001").config["dim"] == 8
    assert json.loads((run / "args.json").read_text())["resumed_from"] == str(FIXTURES / "full.dalle.pt")


def write_vocab(tmp_path: Path) -> Path:
    """A tiny Hugging Face tokenizer of fewer than 20 tokens (the fixtures' num_text_tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path / "tokenizer.json"
    if not path.exists():
        tokenizer = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "x": 2, "y": 3}, unk_token="[UNK]"))
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer.save(str(path))
    return path


def test_a_vae_pt_is_taken_where_a_vae_path_is(tmp_path):
    vae = load_vae(argparse.Namespace(vae_path=str(FIXTURES / "vae.pt"), taming=False))
    assert isinstance(vae, DiscreteVAE) and vae.num_tokens == 16


def test_a_dalle_trained_on_a_released_vae_needs_that_vae(tmp_path, capsys):
    saved = torch.load(FIXTURES / "full.dalle.pt", weights_only=True)
    saved["vae_params"], saved["vae_class_name"] = None, "OpenAIDiscreteVAE"
    torch.save(saved, tmp_path / "dalle.pt")
    with pytest.raises(CheckpointError, match="trained with OpenAIDiscreteVAE.*pass that VAE"):
        load_original(tmp_path / "dalle.pt")
    # the fixtures' DALLE was trained on the VAE of vae.pt: given that VAE, the logits are the original's
    assert_same_logits(load_original(tmp_path / "dalle.pt", vae=load_original(FIXTURES / "vae.pt")), "full")
    convert.main([str(tmp_path / "dalle.pt"), str(tmp_path / "out"), "--vae_path", str(FIXTURES / "vae.pt")])
    assert_same_logits(DALLE.from_pretrained(tmp_path / "out"), "full")
