"""Artefacts are checked before they are trusted: a missing or misshapen weights file, heads of another base and a
malformed ``mtp_config.json`` are one-line errors naming what is wrong; checkpoints are read with weights_only=True
even when the environment asks torch for unpickling."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
from cli_helpers import run_cli
from helpers import REPO, save_tiny_math_shaped_model
from safetensors.torch import load_file, save_file
from test_safe_loading import hostile_ckpt  # noqa: F401 (a fixture)

from lightning_mtp import MTPModule, __version__
from lightning_mtp.artifacts import METHOD_WEIGHTS, MTP_CONFIG, read_mtp_config
from lightning_mtp.hub import push_to_hub


def shipped(name: str, tmp_path: Path) -> Path:
    """A copy of the shipped zoo artefact ``name`` (its base, tiny-math-base, is a zoo name and loads from the zoo)."""
    return Path(shutil.copytree(REPO / "zoo" / name, tmp_path / name))


# ---------------------------------------------------------------------------------------------- weights files
def test_an_artefact_without_its_weights_file_is_refused(tmp_path):
    art = shipped("tiny-math-fastmtp", tmp_path)
    (art / METHOD_WEIGHTS).unlink()
    with pytest.raises(ValueError, match=r"tiny-math-fastmtp lacks mtp_method\.safetensors: its mtp_config\.json "
                                         r"records method 'fast_mtp' .*Copy the whole artefact directory again"):
        MTPModule.from_pretrained(art)
    code, err = run_cli(["generate", "--model", str(art), "--prompt", "Question: 1 + 1?\nAnswer:"])
    assert code == 2 and "lacks mtp_method.safetensors" in err and len(err.splitlines()) == 1


def test_a_method_without_parameters_of_its_own_needs_no_weights_file(tmp_path):
    art = shipped("tiny-math-mask-token", tmp_path)  # mask_token: LoRA adapter, no mtp_method.safetensors
    assert not (art / METHOD_WEIGHTS).exists()
    assert MTPModule.from_pretrained(art).method_config.name == "mask_token"


def test_a_weights_file_that_is_not_safetensors_is_refused(tmp_path):
    art = shipped("tiny-math-fastmtp", tmp_path)
    (art / METHOD_WEIGHTS).write_text("not safetensors")
    with pytest.raises(ValueError, match=r"cannot read .*mtp_method\.safetensors"):
        MTPModule.from_pretrained(art)


def test_heads_of_another_shape_are_one_line_naming_file_key_and_shapes(tmp_path):
    art = shipped("tiny-math-fastmtp", tmp_path)
    state = load_file(art / METHOD_WEIGHTS)
    key = next(k for k, v in state.items() if v.dim() == 2)
    rows, cols = state[key].shape
    state[key] = state[key].new_zeros(rows, cols // 2)  # a head of another hidden size copied in
    save_file(state, str(art / METHOD_WEIGHTS))
    with pytest.raises(ValueError) as err:
        MTPModule.from_pretrained(art)
    message = str(err.value)
    assert "\n" not in message and "size mismatch" not in message
    assert message.startswith(f"{art / METHOD_WEIGHTS}: tensor {key!r} has shape ({rows}, {cols // 2}), but method "
                              f"'fast_mtp' on this backbone has shape ({rows}, {cols})")


def test_heads_of_another_base_name_the_backbone_that_was_passed(tmp_path):
    other = save_tiny_math_shaped_model(tmp_path / "other-base")  # the tiny-math vocabulary, hidden size 32
    with pytest.raises(ValueError, match=rf"trained on a base with vocab 617 and hidden size 192, but the backbone "
                                         rf"'{other}' has vocab 617 and hidden size 32"):
        MTPModule.from_pretrained(shipped("tiny-math-fastmtp", tmp_path), backbone=str(other))


# ---------------------------------------------------------------------------------------------- mtp_config.json
def write_config(tmp_path: Path, change) -> Path:
    """The shipped FastMTP artefact's config with ``change(config)`` applied, written to ``tmp_path``."""
    config = json.loads((REPO / "zoo" / "tiny-math-fastmtp" / MTP_CONFIG).read_text())
    change(config)
    path = tmp_path / MTP_CONFIG
    path.write_text(json.dumps(config))
    return path


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def change(config):
        for key in keys[:-1]:
            config = config[key]
        config[keys[-1]] = value

    return change


BAD_CONFIGS = [
    (_set("library", "peft"), r"field 'library' is 'peft'; expected 'lightning-mtp'"),
    (_set("library_version", "one point two"), r"field 'library_version' is 'one point two'; expected a version"),
    (_set("library_version", 1.2), r"field 'library_version' is 1\.2; expected a version string"),
    (_set("base_model", "vocab_size", "300"), r"field 'base_model\.vocab_size' is '300'; expected a positive integer"),
    (_set("base_model", "hidden_size", 0), r"field 'base_model\.hidden_size' is 0; expected a positive integer"),
    (_set("base_model", "hidden_size", True), r"field 'base_model\.hidden_size' is True; expected a positive integer"),
    (_set("base_model", "name_or_path", 7), r"field 'base_model\.name_or_path' is 7; expected a string or null"),
    (_set("base_model", "vocab_size", None), r"field 'base_model\.vocab_size' is None; expected a positive integer"),
    (_set("base_model", []), r"field 'base_model' is \[\]; expected a JSON object"),
    (_set("method", "fast_mtp"), r"""field 'method' is 'fast_mtp'; expected null or an object with a string "name\""""),
    (_set("method", {"num_steps": 3}), r"field 'method' is \{'num_steps': 3\}; expected null or an object"),
    (_set("decoding", "speculative"), r"field 'decoding' is 'speculative'; expected a JSON object or null"),
    (_set("lora", "r=8"), r"field 'lora' is 'r=8'; expected a JSON object or null"),
    (_set("weights", "heads"),
     r"field 'weights' is 'heads'; expected one of \['method', 'method\+adapter', 'full', 'native'\]"),
]


@pytest.mark.parametrize(("change", "message"), BAD_CONFIGS)
def test_a_malformed_config_names_the_field_the_value_and_what_is_expected(tmp_path, change, message):
    with pytest.raises(ValueError, match=rf"^{tmp_path / MTP_CONFIG}: {message}"):
        read_mtp_config(write_config(tmp_path, change))


def test_a_missing_base_size_is_named(tmp_path):
    path = write_config(tmp_path, lambda config: config["base_model"].pop("hidden_size"))
    with pytest.raises(ValueError, match=r"field 'base_model' lacks 'hidden_size'"):
        read_mtp_config(path)


def test_a_config_from_a_newer_version_warns_with_both_versions_and_loads(tmp_path):
    path = write_config(tmp_path, _set("library_version", "99.1.0"))
    with pytest.warns(UserWarning, match=rf"written by lightning-mtp 99\.1\.0, newer than this lightning-mtp "
                                         rf"{__version__}"):
        assert read_mtp_config(path)["method"]["name"] == "fast_mtp"


def test_weights_beside_a_config_without_method_are_refused(tmp_path):
    (tmp_path / METHOD_WEIGHTS).write_bytes(b"")
    with pytest.raises(ValueError, match=r'records no method \("method": null\), but mtp_method\.safetensors holds '
                                         r"method weights that nothing would load"):
        read_mtp_config(write_config(tmp_path, _set("method", None)))


@pytest.mark.parametrize("config", sorted((REPO / "zoo").glob(f"*/{MTP_CONFIG}")), ids=lambda p: p.parent.name)
def test_every_shipped_config_reads_without_a_warning(config):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_mtp_config(config)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_pushing_a_checkpoint_that_carries_code_is_refused_even_when_torch_is_told_to_unpickle(hostile_ckpt,  # noqa: F811
                                                                                              monkeypatch):
    path, marker = hostile_ckpt
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # would turn a torch.load without weights_only unsafe
    with pytest.raises(Exception, match="Weights only load failed"):
        push_to_hub(path, "someone/model", endpoint="http://127.0.0.1:9")  # refused before any request
    assert not marker.exists()


def test_resuming_from_last_from_the_cli_refuses_code_even_when_torch_is_told_to_unpickle(hostile_ckpt,  # noqa: F811
                                                                                         tmp_path, monkeypatch):
    path, marker = hostile_ckpt
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    shutil.copy(path, ckpt_dir / "last.ckpt")  # "last" is found by Lightning, not read by LightningCLI's own parser
    extra = tmp_path / "checkpointing.yaml"
    extra.write_text(f"trainer:\n  enable_checkpointing: true\n  callbacks:\n"
                     f"    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                     f"      init_args:\n        dirpath: {ckpt_dir}\n        save_last: true\n")
    base = save_tiny_math_shaped_model(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    code, err = run_cli(["fit", "--config", str(REPO / "recipes/tiny-math/fast_mtp.yaml"), "--config", str(extra),
                         "--model.backbone", str(base), "--data.init_args.num_train", "8",
                         "--data.init_args.self_distill", "null", "--trainer.max_steps", "1", "--ckpt_path", "last"])
    assert not marker.exists(), "the checkpoint's pickled code ran"
    assert code == 2 and "Weights only load failed" in err
