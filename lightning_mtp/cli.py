"""The ``lightning-mtp`` command: ``fit`` / ``validate`` (LightningCLI), ``generate``, ``bench``.

Each subcommand is a function ``main(argv)`` in some module, listed once in :data:`COMMANDS`. An expected user
error becomes one line on stderr, no traceback (``--debug`` shows the traceback instead):

- exit code 2, bad input: a :class:`~lightning_mtp.errors.UserInputError` (the ``ValueError`` the library raises
  where it checks input) from any command; a bad argument or recipe (jsonargparse's errors for
  ``fit``/``validate``, :class:`CommandParser`'s for the others); a missing file (``FileNotFoundError``, e.g. a
  ``--ckpt_path``); a checkpoint that ``torch.load(weights_only=True)`` refuses (``pickle.UnpicklingError``); a
  Trainer setting this machine cannot honour (Lightning's ``MisconfigurationException``);
- exit code 1, training failed: :class:`~lightning_mtp.callbacks.NonFiniteLossError` (the loss stayed NaN/inf).

Anything else, another ``ValueError`` included, is a bug: it is shown with its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import pickle  # only for its UnpicklingError: nothing here unpickles
import sys
import warnings
from collections.abc import Iterator

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from transformers import TextStreamer

from lightning_mtp.commands import CommandParser
from lightning_mtp.decoding.schedule import DRAFT_SCHEDULES
from lightning_mtp.errors import UserInputError
from lightning_mtp.module import MTPModule
from lightning_mtp.progress import LogProgressBar, is_terminal

__all__ = ["COMMANDS", "CommandParser", "MTPLightningCLI", "main", "quiet_expected_noise"]

COMMANDS: dict[str, tuple[str, str]] = {
    # name: ("module:function", one-line help)
    "fit": ("lightning_mtp.cli:fit", "train with a recipe: lightning-mtp fit --config recipes/tiny-math/fast_mtp.yaml"),
    "validate": ("lightning_mtp.cli:validate", "evaluate with a recipe: lightning-mtp validate --config RECIPE"),
    "generate": ("lightning_mtp.cli:generate", "stream a decode: lightning-mtp generate --model zoo/tiny-math-fastmtp --prompt TEXT"),
    "bench": ("lightning_mtp.bench:main", "compare decoders: lightning-mtp bench --model zoo/tiny-math-fastmtp --n 50"),
    "distill": ("lightning_mtp.data.distill:main", "self-distil training data: lightning-mtp distill --model M --data D --out DIR"),
    "zoo": ("lightning_mtp.zoo:main", "the model zoo: lightning-mtp zoo list | lightning-mtp zoo info NAME"),
    "export": ("lightning_mtp.convert:main", "serve it in vLLM / SGLang: lightning-mtp export RUN_OR_ARTEFACT --format mimo --out DIR"),
    "push": ("lightning_mtp.hub:main", "upload to the Hub in one commit: lightning-mtp push CKPT_OR_DIR --repo-id NAMESPACE/NAME"),
}


class MTPLightningCLI(LightningCLI):
    """LightningCLI for :class:`MTPModule` recipes, with two changes to what it runs.

    - Checkpoints (``--ckpt_path``, ``last`` included) are read with ``weights_only=True``, passed explicitly, so
      that ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot turn unpickling on: LightningCLI hands ``Trainer.fit`` /
      ``validate`` its ``weights_only`` argument (default None, which that variable turns into False).
      ``--weights_only false`` is refused.
    - When stdout is not a terminal (CI, ``| tee log``), Lightning's own progress bar is replaced by
      :class:`~lightning_mtp.progress.LogProgressBar` lines: its rich bar prints nothing there until training
      ends, and its tqdm bar's carriage-return redraws show in a log as one endless line.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(MTPModule, **kwargs)

    def instantiate_trainer(self, **kwargs) -> Trainer:
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except ValueError as err:  # Trainer checks its arguments, the recipe's trainer section: bad input
            raise UserInputError(str(err)) from err
        bar = trainer.progress_bar_callback
        if type(bar) in (RichProgressBar, TQDMProgressBar) and not is_terminal():  # Lightning's own bars, in a log
            trainer.callbacks[trainer.callbacks.index(bar)] = LogProgressBar()
        return trainer

    def fit(self, model: MTPModule, weights_only: bool | None = None, **kwargs) -> None:
        self.trainer.fit(model, weights_only=_weights_only(weights_only), **kwargs)

    def validate(self, model: MTPModule, weights_only: bool | None = None, **kwargs) -> None:
        self.trainer.validate(model, weights_only=_weights_only(weights_only), **kwargs)


def _weights_only(value: bool | None) -> bool:
    if value is False:
        raise UserInputError("--weights_only false would let a checkpoint run code while it is read; lightning-mtp reads "
                             "checkpoints with weights_only=True only (leave --weights_only out)")
    return True


# What a fit prints that we cause or expect, silenced by message, category and the module it is attributed to;
# nothing broader. (message regex, category, module regex)
_EXPECTED_WARNINGS: list[tuple[str, type[Warning], str]] = [
    # the frozen backbone stays in eval mode on purpose (no dropout in the model the heads learn from)
    (r"Found \d+ module\(s\) in eval mode at the start of training", PossibleUserWarning, r"lightning\.pytorch\."),
    # Lightning's own use of torch's pytree API when it moves a batch; nothing we can change
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
    # torchdata's StatefulDataLoader (the resumable training loader) calls a torch API torch has emptied
    (r"'set_vital' is deprecated", UserWarning, r"torchdata\.stateful_dataloader\."),
]
_LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropTips(logging.Filter):
    """Drops Lightning's advertising ("💡 Tip: For seamless cloud ... try installing litlogger / litmodels")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip:")


@contextlib.contextmanager
def quiet_expected_noise() -> Iterator[None]:
    """Silence, while a fit or validation runs, the warnings in :data:`_EXPECTED_WARNINGS` and Lightning's tips."""
    tips = _DropTips()
    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    with warnings.catch_warnings():
        for message, category, module in _EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        for logger in loggers:
            logger.addFilter(tips)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(tips)


def _lightning_cli(args: list[str]) -> None:
    argv, sys.argv = sys.argv, [sys.argv[0], *args]  # LightningCLI reads sys.argv; keep the two in agreement
    try:  # exit_on_error=False: a bad argument or recipe raises argparse.ArgumentError instead of printing the usage
        with quiet_expected_noise():
            MTPLightningCLI(save_config_kwargs={"overwrite": True}, parser_kwargs={"exit_on_error": False})
    finally:
        sys.argv = argv


def fit(argv: list[str]) -> None:
    _lightning_cli(["fit", *argv])


def validate(argv: list[str]) -> None:
    _lightning_cli(["validate", *argv])


def generate(argv: list[str]) -> None:
    parser = CommandParser(prog="lightning-mtp generate", description="Stream a lossless speculative decode.")
    parser.add_argument("--model", required=True, help="an artefact directory, zoo name or model directory")
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--do-sample", action="store_true")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--num-draft-tokens", type=int, default=None, help="draft length (0 = plain NTP)")
    parser.add_argument("--draft-confidence-threshold", type=float, default=None,
                        help="end a draft chain where the most likely draft has less probability (0 to 1)")
    parser.add_argument("--draft-schedule", choices=DRAFT_SCHEDULES, default=None,
                        help="adaptive (default): shorter chains, down to none, while drafts miss; constant: always K")
    parser.add_argument("--tree", default=None, help="draft token trees: static (Medusa-style), dynamic (EAGLE-2) or "
                        "dynamic:depth=4,top_k=4,total_tokens=16; lossless like chains")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        raise UserInputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")

    module = MTPModule.from_pretrained(args.model).merge_lora()  # decoding only: no adapter overhead per forward
    if module.tokenizer is None:
        raise UserInputError(f"{args.model!r} has no tokenizer to encode the prompt with")
    ids = module.tokenizer(args.prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    streamer = TextStreamer(module.tokenizer, skip_prompt=False, skip_special_tokens=True)
    out = module.generate(
        ids,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        num_draft_tokens=args.num_draft_tokens,
        draft_confidence_threshold=args.draft_confidence_threshold,
        draft_schedule=args.draft_schedule,
        tree=args.tree,
        streamer=streamer,
    )
    print(file=sys.stderr)
    print(out.stats.summary(), file=sys.stderr)


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return f"usage: lightning-mtp {{{','.join(COMMANDS)}}} ... [--debug]\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"lightning-mtp: unknown command {command!r}; choose one of {sorted(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    debug = "--debug" in rest
    rest = [a for a in rest if a != "--debug"]
    module_name, func_name = COMMANDS[command][0].split(":")
    try:
        getattr(importlib.import_module(module_name), func_name)(rest)
    except Exception as err:
        code = _exit_code(err)
        if debug or code is None:
            raise
        message = " ".join(str(err).split())  # jsonargparse's messages span lines: keep the report to one
        if isinstance(err, argparse.ArgumentError):
            message += f" (see lightning-mtp {command} --help)"
        print(f"lightning-mtp {command}: error: {message}", file=sys.stderr)
        sys.exit(code)


def _exit_code(err: Exception) -> int | None:
    """2 for bad input, 1 for a training run that failed as expected, None for a bug (shown with its traceback)."""
    if isinstance(err, (UserInputError, argparse.ArgumentError, FileNotFoundError, pickle.UnpicklingError)):
        return 2  # UnpicklingError: torch.load(weights_only=True) refused a file that is not plain tensors and data
    # modules an error can only come from once they are imported: no import cost for commands that skip them
    lightning_errors = sys.modules.get("lightning.fabric.utilities.exceptions")
    if lightning_errors is not None and isinstance(err, lightning_errors.MisconfigurationException):
        return 2
    callbacks = sys.modules.get("lightning_mtp.callbacks")
    if callbacks is not None and isinstance(err, callbacks.NonFiniteLossError):
        return 1
    return None


if __name__ == "__main__":
    main()
