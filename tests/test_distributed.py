"""Two training processes on the CPU (gloo on 127.0.0.1), launched with torchrun as a user would."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import one_thread, vae_args, write_dataset  # noqa: F401 (one_thread: an autouse fixture)

from dalle_pytorch.cli import generate, train_vae
from dalle_pytorch.text.tokenizer_training import train_tokenizer
from dalle_pytorch.training.run_logging import read_metrics

# each rank runs the real CLI entry point and leaves what only it knows (its weights, its local losses)
DRIVER = textwrap.dedent("""
    import os, sys
    import torch
    from dalle_pytorch.cli import train_dalle
    torch.set_num_threads(1)
    result = train_dalle.run(sys.argv[2:])
    torch.save({"history": result.history, "state": result.model.state_dict(),
                "checkpoints": [str(path) for path in result.checkpoints]},
               os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
""")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_train_one_model_and_rank_zero_writes_one_checkpoint(tmp_path):
    data = write_dataset(tmp_path / "data")
    tokenizer = tmp_path / "tokenizer.json"
    train_tokenizer(data, 300, tokenizer, min_frequency=1)
    vae = tmp_path / "vae"
    train_vae.main(vae_args(data, vae, "--max_steps", "1"))
    driver, results, out = tmp_path / "driver.py", tmp_path / "results", tmp_path / "dalle"
    driver.write_text(DRIVER)
    results.mkdir()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(driver), str(results),
        "--image_text_folder", str(data), "--vae_path", str(vae), "--bpe_path", str(tokenizer), "--dim", "32",
        "--depth", "2", "--heads", "2", "--dim_head", "16", "--text_seq_len", "8", "--truncate_captions",
        "--batch_size", "2", "--max_steps", "4", "--save_every_n_steps", "2", "--output_dir", str(out),
        "--no_progress", "--device", "cpu", "--log_every_n_steps", "1", "--log_sample_ids", "--ff_dropout", "0.1",
        "--powersgd", "--powersgd_start_iter", "2",
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stderr[-3000:]

    ranks = [torch.load(results / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key, tensor in ranks[0]["state"].items():  # DDP (with PowerSGD from step 2) keeps the ranks equal
        assert torch.equal(tensor, ranks[1]["state"][key]), key

    for mine, other in zip(ranks[0]["history"], ranks[1]["history"]):
        assert mine["step"] == other["step"]
        assert mine["local_loss"] != other["local_loss"]  # each rank saw its own samples ...
        expected = (mine["local_loss"] + other["local_loss"]) / 2
        for record in (mine, other):  # ... and both report the average over the ranks
            torch.testing.assert_close(record["loss"], expected, rtol=1e-6, atol=1e-6)
        assert not set(mine["sample_ids"]) & set(other["sample_ids"])
    epoch = [index for step in (0, 1) for rank in ranks for index in rank["history"][step]["sample_ids"]]
    assert sorted(epoch) == list(range(8))  # one epoch of 8 samples split over 2 ranks x 2 steps

    assert [Path(p).name for p in ranks[0]["checkpoints"]] == ["step-00000002", "step-00000004"]
    assert ranks[1]["checkpoints"] == []
    assert sorted(p.name for p in out.glob("step-*")) == ["step-00000002", "step-00000004"]
    assert [record["step"] for record in read_metrics(out)] == [1, 2, 3, 4]  # one writer of the logs
    saved = load_file(str(out / "step-00000004" / "model.safetensors"))
    for key, tensor in saved.items():
        assert torch.equal(tensor, ranks[0]["state"][key]), key

    outputs = tmp_path / "outputs"
    generate.main(["--dalle_path", str(out), "--text", "a red square", "--num_images", "2", "--outputs_dir",
                   str(outputs), "--device", "cpu"])  # fmt: skip
    metadata = json.loads((outputs / "a_red_square" / "metadata.json").read_text())
    assert metadata["dalle_path"].endswith("step-00000004") and len(metadata["images"]) == 2


@pytest.mark.parametrize("variable", ["RANK", "WORLD_SIZE"])
def test_a_malformed_launcher_environment_is_a_clear_error(monkeypatch, variable):
    from dalle_pytorch.training.distributed import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv(variable, "two")
    with pytest.raises(ValueError, match=variable):
        init_distributed("cpu")


@pytest.mark.slow
def test_deepspeed_zero_matches_plain_training(tmp_path):
    pytest.importorskip("deepspeed")
    data = write_dataset(tmp_path / "data")
    common = vae_args(data, tmp_path / "unused", "--max_steps", "3", "--batch_size", "2", "--save_every_n_steps", "2")
    common = common[: common.index("--output_dir")] + common[common.index("--output_dir") + 2 :]
    plain, zero = tmp_path / "plain", tmp_path / "zero"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1"]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    for out, extra in ((plain, []), (zero, ["--deepspeed", "--zero_stage", "3", "--keep_n_checkpoints", "1"])):
        command = [*torchrun, "--master_port", str(free_port()), "-m", "dalle_pytorch.cli.train_vae", *common,
                   "--output_dir", str(out), *extra]  # fmt: skip
        finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
        assert finished.returncode == 0, finished.stderr[-3000:]
    # ZeRO-3 partitions the weights over the ranks; the checkpoint holds them whole, as plain DDP's does
    plain_weights = load_file(str(plain / "step-00000003" / "model.safetensors"))
    zero_weights = load_file(str(zero / "step-00000003" / "model.safetensors"))
    for key, tensor in plain_weights.items():
        torch.testing.assert_close(zero_weights[key], tensor, rtol=1e-4, atol=1e-6)
    assert sorted(p.name for p in zero.glob("step-*")) == ["step-00000003"]
    assert sorted(p.name for p in (zero / "deepspeed").glob("step-*")) == ["step-00000003"]
