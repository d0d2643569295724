"""Bad values at the API and hostile output folders: each a ValueError/TypeError naming the argument (or a
documented cast), never a silent wrong result; generation never writes through a planted symlink."""

import json

import pytest
import torch

from dalle_pytorch.cli import generate
from dalle_pytorch.cli.common import run_main
from dalle_pytorch.data.text_image import NoUsableSampleError
from dalle_pytorch.io.checkpoint import CheckpointError
from dalle_pytorch.io.safe_pickle import CheckpointFormatError
from tests.conftest import make_dalle, make_vae, random_images, random_text


@pytest.fixture(autouse=True)
def one_thread():
    # the test machine's cores are shared: OpenMP spin-waiting makes tiny models much slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ DALLE generation


@pytest.mark.parametrize("name", ["temperature", "cond_scale"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_sampling_options_are_refused(name, value):
    dalle = make_dalle()
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        dalle.generate_image_codes(random_text(1), **{name: value})


def test_generator_of_the_wrong_type_is_refused():
    dalle = make_dalle()
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        dalle.generate_image_codes(random_text(1), generator=42)
    with pytest.raises(TypeError, match="generator list must hold only torch.Generator"):
        dalle.generate_image_codes(random_text(2), generator=[torch.Generator(), 7])
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        dalle.generate_texts(tokenizer=None, generator="seed")


def test_num_init_img_tokens_without_img_is_refused():
    with pytest.raises(ValueError, match="num_init_img_tokens .* needs img"):
        make_dalle().generate_image_codes(random_text(1), num_init_img_tokens=4)


def test_valid_generators_still_work():
    dalle = make_dalle()
    a = dalle.generate_image_codes(random_text(2), generator=[torch.Generator().manual_seed(i) for i in range(2)])
    b = dalle.generate_image_codes(random_text(2), generator=tuple(torch.Generator().manual_seed(i) for i in range(2)))
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------ DiscreteVAE


def test_decode_with_the_wrong_number_of_codes_is_refused():
    vae = make_vae()  # 16 px, 2 layers: a 4x4 grid of 16 codes
    with pytest.raises(ValueError, match="img_seq must hold 16 codes per image"):
        vae.decode(torch.zeros(1, 64, dtype=torch.long))


@pytest.mark.parametrize("code", [-1, 32])
def test_decode_with_out_of_range_codes_is_refused(code):
    vae = make_vae()
    codes = torch.zeros(1, 16, dtype=torch.long)
    codes[0, 5] = code
    with pytest.raises(ValueError, match=r"img_seq codes must be in \[0, 32\)"):
        vae.decode(codes)


@pytest.mark.parametrize("temp", [0, -0.5, float("nan")])
def test_non_positive_gumbel_temperature_is_refused(temp):
    with pytest.raises(ValueError, match="temp must be a number > 0"):
        make_vae()(random_images(1), temp=temp)


def test_nan_images_are_refused():
    images = random_images(2)
    images[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="images contain NaN"):
        make_vae()(images, return_loss=True)
    with pytest.raises(ValueError, match="images contain NaN"):
        make_dalle()(random_text(2), images, return_loss=True)


def test_float64_images_are_cast_to_the_weights_dtype():
    vae = make_vae()
    images = random_images(2)
    double = images.double()
    torch.testing.assert_close(vae(double, return_logits=True), vae(images, return_logits=True))
    assert double.dtype == torch.float64  # the caller's tensor is untouched
    dalle = make_dalle()
    text = random_text(2)
    torch.testing.assert_close(dalle(text, double, return_loss=True), dalle(text, images, return_loss=True))


# ------------------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize(
    "error",
    [CheckpointError("a/config.json: bad"), CheckpointFormatError("enc.pkl: bad"), NoUsableSampleError("no sample")],
)
def test_cli_reports_load_and_data_errors_in_one_line(error, capsys):
    def run(argv):
        raise error

    with pytest.raises(SystemExit) as stop:
        run_main("dalle-x", run, [])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"dalle-x: error: {error}\n"


def test_generate_writes_no_file_through_a_planted_symlink(tmp_path):
    torch.manual_seed(0)
    make_dalle(num_text_tokens=49409).save_pretrained(tmp_path / "dalle")  # the default tokenizer's vocabulary
    outputs = tmp_path / "outputs"
    folder = outputs / "a_red_square"
    folder.mkdir(parents=True)
    (folder / "metadata.json").write_text(json.dumps({"prompt": "a red square"}))  # as if from an earlier run
    victims = {name: tmp_path / f"victim-{name}" for name in ("grid.png", "args.json")}
    for victim in victims.values():
        victim.write_text("precious")
    (folder / "grid.png").symlink_to(victims["grid.png"])
    (outputs / "args.json").symlink_to(victims["args.json"])

    generate.main(["--dalle_path", str(tmp_path / "dalle"), "--text", "a red square", "--num_images", "1",
                   "--outputs_dir", str(outputs), "--device", "cpu"])  # fmt: skip

    for victim in victims.values():
        assert victim.read_text() == "precious"
    assert not (folder / "grid.png").is_symlink() and (folder / "grid.png").stat().st_size > 0
    assert json.loads((outputs / "args.json").read_text())["tool"] == "dalle-generate"


def test_generate_does_not_reuse_a_folder_whose_metadata_is_a_symlink(tmp_path):
    torch.manual_seed(0)
    make_dalle(num_text_tokens=49409).save_pretrained(tmp_path / "dalle")
    outputs = tmp_path / "outputs"
    folder = outputs / "a_red_square"
    folder.mkdir(parents=True)
    victim = tmp_path / "victim.json"
    victim.write_text(json.dumps({"prompt": "a red square"}))
    (folder / "metadata.json").symlink_to(victim)

    generate.main(["--dalle_path", str(tmp_path / "dalle"), "--text", "a red square", "--num_images", "1",
                   "--outputs_dir", str(outputs), "--device", "cpu"])  # fmt: skip

    assert json.loads(victim.read_text()) == {"prompt": "a red square"}
    assert json.loads((outputs / "a_red_square-2" / "metadata.json").read_text())["prompt"] == "a red square"
