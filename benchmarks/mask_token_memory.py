"""Peak training memory of mask-token MTP: the LoRA teacher (adapter disabled) against a frozen-copy teacher.

Each configuration runs in a fresh process on the same model and the same batches: build the MTPModule, then a
few AdamW steps of ``training_loss`` (student forward + teacher forward + backward + step). The peak is the
process's peak resident memory (CPU) or CUDA's peak allocation, above what the process held after its imports,
so it counts the model, the teacher, gradients, optimizer states and activations.

    python benchmarks/mask_token_memory.py                       # the shipped tiny-math base (4.5M parameters)
    python benchmarks/mask_token_memory.py --config-overrides '{"hidden_size": 768, "intermediate_size": 2048,
        "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 12, "head_dim": 64}'
                                                                 # a random ~90M-parameter model of the same shape family

Configurations: ``full`` (full fine-tuning, frozen copy of the initial model as teacher: the paper's setting),
``lora`` (LoRA student, teacher = the same weights with the adapter disabled: no copy) and ``lora+copy`` (LoRA
student with a frozen copy as teacher: isolates what the copy costs).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys

CONFIGS = {
    "full": {"lora": None, "teacher": "auto"},
    "lora": {"lora": {"r": 32, "lora_alpha": 64, "target_modules": "all-linear"}, "teacher": "auto"},
    "lora+copy": {"lora": {"r": 32, "lora_alpha": 64, "target_modules": "all-linear"}, "teacher": "copy"},
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(name: str, args: argparse.Namespace) -> dict:
    """Run one configuration in this process and return its peak memory above the post-import baseline."""
    import torch

    from lightning_mtp import MTPModule
    from lightning_mtp.data.datamodule import TinyMathDataModule

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dm = TinyMathDataModule(num_train=args.batch_size * args.steps, num_val=1, batch_size=args.batch_size,
                            tokenizer="zoo/tiny-math-base")
    dm.setup("fit")
    batches = list(itertools.islice(dm.train_dataloader(), args.steps))
    base = _rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / 2**20
    config = CONFIGS[name]
    overrides = json.loads(args.config_overrides) if args.config_overrides else None
    method = {"name": "mask_token", "k_min": args.k, "k_max": args.k, "regions_per_sequence": args.regions,
              "teacher": config["teacher"]}
    module = MTPModule("tiny-math-base", method=method, lora=config["lora"], from_scratch=overrides is not None,
                       config_overrides=overrides).to(device)
    params = sum(p.numel() for p in module.backbone.parameters())
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    module.train()
    torch.manual_seed(0)
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        loss, _ = module.method.training_loss(module, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KB on Linux
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"config": name, "params": params, "trainable": trainable, "peak_mb": peak - base}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-overrides", default=None, help="JSON: backbone config fields (random weights)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--regions", type=int, default=16, help="mask regions per sequence")
    parser.add_argument("--k", type=int, default=8, help="k (fixed, so every configuration has the same shapes)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    parser.add_argument("--one", choices=sorted(CONFIGS), help=argparse.SUPPRESS)  # internal: one config, this process
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return []
    rows = []
    for name in CONFIGS:  # a fresh process each: peaks never carry over
        cmd = [sys.executable, __file__, "--one", name, *(argv if argv is not None else sys.argv[1:])]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    full = rows[0]["peak_mb"]
    print(f"{'config':<10} {'params':>12} {'trainable':>12} {'peak MB':>9} {'x full':>7}")
    for row in rows:
        row["ratio_vs_full"] = row["peak_mb"] / full
        print(f"{row['config']:<10} {row['params']:>12,} {row['trainable']:>12,} {row['peak_mb']:>9.1f} "
              f"{row['ratio_vs_full']:>7.2f}")
    if args.json:
        from pathlib import Path

        from lightning_mtp.artifacts import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
