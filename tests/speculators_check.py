"""Run by the speculators environment's own Python (tests/test_export_speculators.py): load an exported draft with
the speculators package and write what its forward makes of given inputs.

    python speculators_check.py EXPORT_DIR INPUTS.safetensors OUTPUTS.safetensors

An ``mtp`` draft reads ``input_ids`` and the verifier's last ``hidden`` state; an ``eagle3`` draft reads
``input_ids`` (the token after each position) and the feature layers' ``hidden`` states, and is unrolled over
``ttt_steps`` steps (its lm_head's outputs are written, one per step). Prints one JSON line: the file's tensors the
model has no place for, the model's tensors the file lacks (the verifier's embedding and output head are read from
the verifier, not the file), and the draft length the config gives.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig
from speculators.models.mtp import MTPDraftModel


def mtp(export_dir: str, inputs: dict) -> tuple[torch.nn.Module, list[torch.Tensor], int]:
    model = MTPDraftModel.from_pretrained(export_dir).eval()
    with torch.no_grad():
        logits, _, _ = model(input_ids=inputs["input_ids"], hidden_states=inputs["hidden"])
    return model, list(logits), model.config.num_speculative_steps


def eagle3(export_dir: str, inputs: dict) -> tuple[torch.nn.Module, list[torch.Tensor], int]:
    config = Eagle3SpeculatorConfig.from_pretrained(export_dir)
    config.transformer_layer_config._attn_implementation = "eager"  # flex attention needs a compiler on CPU
    model = Eagle3DraftModel.from_pretrained(export_dir, config=config).eval()
    # the embedding, from the verifier: from_pretrained may have initialised the missing tensor already, and the
    # public load_verifier_weights keeps any value it finds
    model._load_verifier_weights(overwrite_embed_tokens=True)
    steps: list[torch.Tensor] = []
    model.lm_head.register_forward_hook(lambda module, args, out: steps.append(out))
    ids = inputs["input_ids"]
    with torch.no_grad():
        model(hidden_states=inputs["hidden"], input_ids=ids, document_ids=torch.zeros_like(ids),
              ttt_steps=int(inputs["ttt_steps"]))
    return model, steps, config.speculators_config.proposal_methods[0].speculative_tokens


def main(export_dir: str, inputs_path: str, outputs_path: str) -> None:
    kind = json.loads((Path(export_dir) / "config.json").read_text())["speculators_model_type"]
    model, logits, steps = {"mtp": mtp, "eagle3": eagle3}[kind](export_dir, load_file(inputs_path))
    file_keys = set(load_file(str(Path(export_dir) / "model.safetensors")))
    model_keys = set(model.state_dict())
    save_file({f"step{i}": step.float().contiguous() for i, step in enumerate(logits)}, outputs_path)
    print(json.dumps({"unexpected": sorted(file_keys - model_keys), "missing": sorted(model_keys - file_keys),
                      "steps": steps}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
