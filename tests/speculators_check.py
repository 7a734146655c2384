"""Run by the speculators environment's own Python (tests/test_export_speculators.py): load an exported draft with
the speculators package and write what its forward makes of given inputs.

    python speculators_check.py EXPORT_DIR INPUTS.safetensors OUTPUTS.safetensors

Prints one JSON line: the file's tensors the model has no place for, and the model's tensors the file lacks
(the verifier's embedding and output head are read from the verifier, not the file).
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from speculators.models.mtp import MTPDraftModel


def main(export_dir: str, inputs_path: str, outputs_path: str) -> None:
    model = MTPDraftModel.from_pretrained(export_dir).eval()
    file_keys = set(load_file(str(Path(export_dir) / "model.safetensors")))
    model_keys = set(model.state_dict())
    inputs = load_file(inputs_path)
    with torch.no_grad():
        logits, _, _ = model(input_ids=inputs["input_ids"], hidden_states=inputs["hidden"])
    save_file({f"step{i}": step.float().contiguous() for i, step in enumerate(logits)}, outputs_path)
    print(json.dumps({"unexpected": sorted(file_keys - model_keys), "missing": sorted(model_keys - file_keys),
                      "steps": model.config.num_speculative_steps}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
