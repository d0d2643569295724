"""What the command-line tools share beyond their flags (`dalle_pytorch.cli.flags`): choosing a tokenizer and a
VAE, finding checkpoints, `args.json`, running the training loop, and turning failures into clear exit messages.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from dalle_pytorch._version import __version__
from dalle_pytorch.cli.flags import DEFAULT_SEED, add_arg
from dalle_pytorch.cli.runs import (
    ARGS_NAME,
    MODEL_FLAGS,
    default_output_dir,
    model_settings,
    note,
    record_model_settings,
)
from dalle_pytorch.convert.original import is_original_checkpoint, load_original
from dalle_pytorch.io.atomic import atomic_write_file
from dalle_pytorch.io.checkpoint import CONFIG_NAME, CheckpointError, PretrainedMixin, read_config
from dalle_pytorch.io.download import DownloadError
from dalle_pytorch.training.state import (
    TRAINING_STATE_NAME,
    CheckpointManager,
    checkpoint_problem,
    read_training_state,
)
from dalle_pytorch.training.trainer import (
    NonFiniteLossError,
    Trainer,
    TrainingInterrupted,
    TrainingSettings,
)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------ checkpoints


def resolve_checkpoint(
    path: str | os.PathLike, flag: str, *, expect: str | None = None, training_state: bool = False
) -> Path:
    """A model folder, or the newest intact `step-*` checkpoint inside a training output folder (a damaged
    newer one is reported and skipped). Raises CheckpointError (one line naming the file) when the folder is
    damaged, or holds another kind of model than `expect` (a class name). `training_state`: check
    `training_state.pt` too."""
    path = Path(path)
    if is_original_checkpoint(path):
        return path  # read by load_model
    if (path / CONFIG_NAME).is_file():
        problem = checkpoint_problem(path, training_state)
        if problem is not None:
            raise CheckpointError(f"{flag}: {problem}")
        checkpoint = path
    else:
        manager = CheckpointManager(path)
        checkpoint = manager.latest_intact(
            lambda damaged, problem: note(flag, f"skipping the damaged checkpoint {damaged.name}: {problem}"),
            training_state,
        )
        if checkpoint is None:
            if manager.checkpoints():
                raise CheckpointError(f"{flag}: every checkpoint in {path} is damaged")
            if path.is_file():
                raise FileNotFoundError(f"{flag}: {path} is a file, not a model folder or training output folder")
            raise FileNotFoundError(
                f"{flag}: {path} is neither a model folder (with {CONFIG_NAME}) nor a training "
                "output folder with step-* checkpoints"
            )
    if expect is not None and checkpoint.is_dir():
        model_type = read_config(checkpoint)["model_type"]
        if model_type != expect and MODEL_FLAGS.get(model_type, flag) != flag:
            raise CheckpointError(
                f"{flag}: {checkpoint} holds a {model_type}, not a {expect} (it belongs in {MODEL_FLAGS[model_type]})"
            )
    return checkpoint


def load_model(checkpoint: Path, cls: type, flag: str, map_location: Any = "cpu") -> Any:
    """`cls.from_pretrained(checkpoint)`, or for a `.pt` file of the original DALLE-pytorch its conversion."""
    if not is_original_checkpoint(checkpoint):
        return cls.from_pretrained(checkpoint, map_location=map_location)
    model = load_original(checkpoint)
    if not isinstance(model, cls):
        raise CheckpointError(f"{flag}: {checkpoint} holds a {type(model).__name__}, not a {cls.__name__}")
    note(flag, f"{checkpoint} is a checkpoint of the original DALLE-pytorch, converted in memory (dalle-convert "
               "converts it once; its optimizer state is not used)")  # fmt: skip
    return model.to(map_location)


def resume_dir(args: argparse.Namespace, expect: str | None = None) -> Path | None:
    """The checkpoint `--resume` names (None for a fresh start); `expect`: the model class it must hold."""
    if args.resume is None:
        return None
    if args.resume == "latest":
        folder = default_output_dir(args)
        if not CheckpointManager(folder).checkpoints():
            print(f"--resume: no checkpoint in {folder} yet; starting from scratch", file=sys.stderr)
            return None
        return resolve_checkpoint(folder, "--resume", expect=expect, training_state=True)
    directory = resolve_checkpoint(args.resume, "--resume", expect=expect, training_state=True)
    if not (directory / TRAINING_STATE_NAME).is_file():
        raise FileNotFoundError(f"--resume: {directory} holds no {TRAINING_STATE_NAME} to resume from")
    return directory


def choose_seed(args: argparse.Namespace, checkpoint: Path | None) -> int:
    """--seed, else the seed of the run being resumed, else DEFAULT_SEED."""
    if args.seed is not None:
        return args.seed
    if checkpoint is not None and (checkpoint / TRAINING_STATE_NAME).is_file():
        state = read_training_state(checkpoint)
        seed = (state.get("extra") or {}).get("seed")
        if isinstance(seed, int):
            return seed
    return DEFAULT_SEED


def write_args_json(output_dir: str | os.PathLike, tool: str, args: argparse.Namespace, **more: Any) -> Path:
    """`output_dir/args.json`: the tool, library version and every flag (plus `more`). A resumed run keeps
    the records of its earlier invocations under `earlier_invocations`, oldest first."""
    record = {
        "tool": tool,
        "library_version": __version__,
        "args": {
            key: str(value) if isinstance(value, Path) else value
            for key, value in vars(args).items()
            if not key.startswith("_")
        },
        **more,
    }
    path = Path(output_dir) / ARGS_NAME
    if more.get("resumed_from") is not None and path.is_file():
        try:
            earlier = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            earlier = None
        if isinstance(earlier, dict) and earlier.get("tool") == tool:
            record["earlier_invocations"] = [*earlier.pop("earlier_invocations", []), earlier]
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2, default=str) + "\n"
    atomic_write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))  # replaces a link, never follows
    return path


def read_args_json(checkpoint: Path) -> dict[str, Any]:
    """The args.json of the training run a checkpoint came from ({} if none)."""
    for folder in (checkpoint, checkpoint.parent):
        if (folder / ARGS_NAME).is_file():
            return json.loads((folder / ARGS_NAME).read_text(encoding="utf-8"))
    return {}


# ------------------------------------------------------------------------------------------ tokenizer


def add_tokenizer_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tokenizer (default: the CLIP BPE tokenizer)")
    add_arg(
        group,
        "--bpe_path",
        default=None,
        help="a tokenizer file: Hugging Face tokenizers JSON (.json), a YouTokenToMe model, or with "
        "--chinese a WordPiece vocab.txt",
    )
    add_arg(group, "--hug", action="store_true", help="--bpe_path is a Hugging Face tokenizers file")
    add_arg(group, "--chinese", action="store_true", help="--bpe_path is a Chinese WordPiece vocab.txt")


def tokenizer_spec(args: argparse.Namespace) -> dict[str, Any]:
    """{'kind': simple|hug|yttm|chinese, 'path': absolute path or None}, as stored in args.json."""
    if args.bpe_path is None:
        if args.hug or args.chinese:
            raise ValueError("--hug and --chinese need --bpe_path (the tokenizer file)")
        return {"kind": "simple", "path": None}
    path = str(Path(args.bpe_path).resolve())
    if args.chinese:
        return {"kind": "chinese", "path": path}
    if args.hug or path.endswith(".json"):
        return {"kind": "hug", "path": path}
    return {"kind": "yttm", "path": path}


def tokenizer_spec_for(args: argparse.Namespace, checkpoint: Path | None) -> dict[str, Any]:
    """The tokenizer the flags name, else the one the checkpoint's training run used (its args.json), else
    the default."""
    if args.bpe_path is not None or args.hug or args.chinese or checkpoint is None:
        return tokenizer_spec(args)
    spec = read_args_json(checkpoint).get("tokenizer")
    if isinstance(spec, dict) and spec.get("kind") in ("simple", "hug", "yttm", "chinese"):
        return spec
    return tokenizer_spec(args)


def build_tokenizer(spec: dict[str, Any]) -> Any:
    from dalle_pytorch.text import tokenizer as tokenizers

    kinds: dict[str, Callable[..., Any]] = {
        "hug": tokenizers.HugTokenizer,
        "yttm": tokenizers.YttmTokenizer,
        "chinese": tokenizers.ChineseTokenizer,
    }
    if spec["kind"] == "simple":
        return tokenizers.tokenizer
    if spec["kind"] not in kinds:
        raise ValueError(f"unknown tokenizer kind {spec['kind']!r}")
    return kinds[spec["kind"]](spec["path"])


def check_tokenizer_fits(tokenizer: Any, model: Any, name: str) -> None:
    """A clear error when the tokenizer makes ids the model's text embedding does not have."""
    if tokenizer.vocab_size > model.num_text_tokens:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, the {name} only {model.num_text_tokens}: "
            "pass the tokenizer it was trained with (--bpe_path)"
        )


# ------------------------------------------------------------------------------------------ VAE


# the constructor argument of each released file -> the flag that gives it
VAE_FILE_FLAGS = {
    "encoder_path": "--openai_encoder_path",
    "decoder_path": "--openai_decoder_path",
    "vqgan_model_path": "--vqgan_model_path",
    "vqgan_config_path": "--vqgan_config_path",
}


def add_vae_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("image tokenizer (default: OpenAI's discrete VAE)")
    add_arg(group, "--vae_path", default=None, help="a trained VAE: a model folder or a dalle-train-vae output folder")
    add_arg(group, "--taming", action="store_true", help="use a taming-transformers VQGAN")
    add_arg(group, "--vqgan_model_path", default=None, help="VQGAN .ckpt (default: the ImageNet f16 1024 model)")
    add_arg(group, "--vqgan_config_path", default=None, help="VQGAN model.yaml belonging to --vqgan_model_path")
    add_arg(group, "--openai_encoder_path", default=None, help="OpenAI dVAE encoder.pkl (default: from the cache)")
    add_arg(group, "--openai_decoder_path", default=None, help="OpenAI dVAE decoder.pkl (default: from the cache)")


def load_vae(args: argparse.Namespace) -> torch.nn.Module:
    """The VAE the flags choose: --vae_path, --taming, else OpenAI's."""
    if args.vae_path is not None:
        if args.taming:
            raise ValueError("give either --vae_path or --taming, not both")
        checkpoint = resolve_checkpoint(args.vae_path, "--vae_path", expect="DiscreteVAE")
        return load_model(checkpoint, PretrainedMixin, "--vae_path")
    from dalle_pytorch.image_tokenizers.pretrained_vae import OpenAIDiscreteVAE, VQGanVAE

    try:
        if args.taming:
            return VQGanVAE(args.vqgan_model_path, args.vqgan_config_path)
        return OpenAIDiscreteVAE(args.openai_encoder_path, args.openai_decoder_path)
    except DownloadError as error:  # name the flags, not the Python arguments
        message = str(error)
        for argument, flag in VAE_FILE_FLAGS.items():
            message = message.replace(f"{argument}=<path to the file>", f"{flag} PATH")
        raise DownloadError(message) from None


# ------------------------------------------------------------------------------------------ exits


def run_main(prog: str, run: Callable[[list[str] | None], Any], argv: list[str] | None) -> None:
    """Runs a tool, turning expected failures into a one-line message and an exit status."""
    try:
        run(argv)
    except TrainingInterrupted as stop:
        print(f"{prog}: interrupted; checkpoint: {stop.checkpoint}", file=sys.stderr)
        raise SystemExit(130) from None
    except NonFiniteLossError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except (ValueError, OSError, ImportError, DownloadError, CheckpointError, SafetensorError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def fit(
    tool: str,
    args: argparse.Namespace,
    model: Any,
    data: Any,
    loss_fn: Callable,
    ctx: Any,
    *,
    seed: int,
    on_sample: Callable | None,
    resume_from: Path | None,
    flag_aliases: dict[str, str] | None = None,
    **args_json_extra: Any,
):
    """The tail every training tool shares: build the trainer, resume from `resume_from` when given,
    write args.json on the main process (with the model's real settings: `record_model_settings`, with
    `flag_aliases` flag -> config name), train, and say where the run ended. `args_json_extra` may override
    args.json's `resumed_from` (a fine-tuning run names the checkpoint it started from without resuming it).
    Call `runs.settle_output_dir` first."""
    record_model_settings(args, model, flag_aliases)
    args.epochs = epochs_limit(args)
    run_config = {key: value for key, value in vars(args).items() if not key.startswith("_")}
    settings = TrainingSettings.from_args(args, seed=seed, run_config=run_config)
    trainer = Trainer(model, data, loss_fn, settings, ctx, on_sample=on_sample)
    if resume_from is not None:
        trainer.resume(resume_from)
    if ctx.is_main:
        args_json_extra.setdefault("resumed_from", str(resume_from) if resume_from is not None else None)
        write_args_json(args.output_dir, tool, args, seed=seed, model=model_settings(model), **args_json_extra)
    result = trainer.fit()
    if ctx.is_main:
        print(f"{tool}: {ending(result, settings)}; final checkpoint: {CheckpointManager(args.output_dir).latest()}")
    return result


def epochs_limit(args: argparse.Namespace) -> int | None:
    """--epochs as given; else the tool's default, unless --max_steps is given (then the steps decide)."""
    if args.epochs is not None:
        return args.epochs
    return None if args.max_steps is not None else args._default_epochs


def ending(result: Any, settings: TrainingSettings) -> str:
    """'stopped at step 6: --max_steps 6 reached' (which limit ended the run)."""
    if result.stopped_by == "max_steps":
        return f"stopped at step {result.step}: --max_steps {settings.max_steps} reached"
    return f"stopped at step {result.step}: --epochs {settings.epochs} done"
