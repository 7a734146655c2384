"""``lightning-mtp bench``: decoders side by side, in one process, on the same prompts, interleaved.

Entries: ``hf_greedy`` (``backbone.generate``, greedy, KV cache: the baseline), ``ntp`` (our decoder with
no drafts: the same machinery as the method), and the method's own (named by its registered name).
Every ratio is against a baseline measured in the same run on the same prompts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["BenchEntry", "load_prompts", "run_bench", "main"]


@dataclass
class BenchEntry:
    name: str
    seconds: list[float] = field(default_factory=list)  # per prompt, median over repeats
    new_tokens: int = 0
    forwards: int = 0
    outputs: list[list[int]] = field(default_factory=list)
    stats: object | None = None  # merged DecodeStats for our decoders

    def as_dict(self, baseline: BenchEntry, ntp: BenchEntry | None, answers: list[int] | None, tokenizer) -> dict:
        total = sum(self.seconds)
        tps = self.new_tokens / total if total else 0.0
        base_tps = baseline.new_tokens / sum(baseline.seconds) if sum(baseline.seconds) else 0.0
        out = {
            "name": self.name,
            "tokens_per_forward": self.new_tokens / self.forwards if self.forwards else 1.0,
            "tokens_per_second": tps,
            "speedup_vs_hf": tps / base_tps if base_tps else 0.0,
            "identical_to_ntp": sum(a == b for a, b in zip(self.outputs, baseline.outputs, strict=True)) / max(1, len(self.outputs)),
            "new_tokens": self.new_tokens,
            "seconds": total,
        }
        if ntp is not None and sum(ntp.seconds):
            out["speedup_vs_ntp"] = tps / (ntp.new_tokens / sum(ntp.seconds))
        if self.stats is not None:
            s = self.stats
            steps = max(1, s.backbone_forwards - len(self.outputs))  # decode steps, prefills excluded
            out["tokens_per_forward"] = s.tokens_per_forward
            out["acceptance_per_position"] = s.acceptance_per_position
            out["cumulative_acceptance"] = s.cumulative_acceptance
            out["draft_ms_per_step"] = 1000 * s.draft_seconds / steps
            out["verify_ms_per_step"] = 1000 * s.verify_seconds / steps
        out["accuracy"] = None
        if answers is not None and tokenizer is not None:
            from lightning_mtp.data.tiny_math import answer_accuracy

            texts = tokenizer.batch_decode(self.outputs, skip_special_tokens=True)
            out["accuracy"] = answer_accuracy(texts, answers)
        return out


def load_prompts(spec: str, n: int) -> tuple[list[str], list[int] | None]:
    """``tiny-math`` (held-out test problems, with answers) or a JSONL file with a ``prompt`` field."""
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if spec == "tiny-math":
        from lightning_mtp.data.tiny_math import problems

        ps = problems("test", n)
        return [p.prompt for p in ps], [p.answer for p in ps]
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"prompt set {spec!r} is neither 'tiny-math' nor an existing JSONL file")
    prompts: list[str] = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{spec}:{lineno} is not valid JSON (expected one object per line with a 'prompt' field)") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f"{spec}:{lineno} has no string 'prompt' field")
        prompts.append(record["prompt"])
        if len(prompts) == n:
            break
    if not prompts:
        raise ValueError(f"{spec} holds no prompts")
    return prompts, None


def run_bench(module, prompts: list[str], answers: list[int] | None = None, *, max_new_tokens: int = 128,
              repeats: int = 1, warmup: int = 2, progress: bool = True) -> list[dict]:
    """Time ``hf_greedy``, ``ntp`` and the module's method on every prompt, interleaved; return JSON rows."""
    from rich.progress import Progress

    tok = module.tokenizer
    if tok is None:
        raise ValueError("the model has no tokenizer to encode the prompts with")
    module.eval()
    backbone = module.backbone
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    encoded = [tok(p, return_tensors="pt", add_special_tokens=False)["input_ids"].to(module.device) for p in prompts]

    def hf(ids):
        seq = backbone.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                attention_mask=torch.ones_like(ids))
        return seq, None

    def ours(**options):
        def run(ids):
            out = module.generate(ids, max_new_tokens=max_new_tokens, **options)
            return out.sequences, out.stats
        return run

    decoders = {"hf_greedy": hf, "ntp": ours(num_draft_tokens=0)}
    if module.method is not None:
        decoders.update({name: ours(**options) for name, options in module.method.bench_entries()})
    entries = {name: BenchEntry(name) for name in decoders}
    for ids in encoded[:warmup]:
        for fn in decoders.values():
            fn(ids)
    names = list(decoders)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("bench", total=len(encoded) * repeats * len(names))
        for i, ids in enumerate(encoded):
            times: dict[str, list[float]] = {n: [] for n in names}
            for r in range(repeats):
                order = names[(i + r) % len(names):] + names[: (i + r) % len(names)]  # rotate who goes first
                for name in order:
                    t0 = time.perf_counter()
                    seq, stats = decoders[name](ids)
                    times[name].append(time.perf_counter() - t0)
                    bar.advance(task)
                    if r == 0:
                        e = entries[name]
                        new = seq[0, ids.shape[1]:].tolist()
                        e.outputs.append(new)
                        e.new_tokens += len(new)
                        e.forwards += stats.backbone_forwards if stats is not None else len(new)
                        if stats is not None:
                            e.stats = stats if e.stats is None else e.stats.merge(stats)
            for name in names:
                entries[name].seconds.append(statistics.median(times[name]))
    base, ntp = entries["hf_greedy"], entries["ntp"]
    rows = [e.as_dict(base, ntp, answers, tok) for e in entries.values()]
    for row in rows:
        if row["name"] == "hf_greedy":
            row["tokens_per_forward"] = 1.0
    return rows


COLUMNS = {  # JSON key: table header
    "name": "name",
    "tokens_per_forward": "tok/fwd",
    "tokens_per_second": "tok/s",
    "speedup_vs_hf": "x hf",
    "speedup_vs_ntp": "x ntp",
    "accuracy": "acc",
    "identical_to_ntp": "same",
    "acceptance_per_position": "AR per position",
    "draft_ms_per_step": "draft ms",
    "verify_ms_per_step": "verify ms",
}


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="lightning-mtp bench")
    for key, header in COLUMNS.items():
        table.add_column(header, justify="left" if key == "name" else "right", no_wrap=True)

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, list):
            return " ".join(f"{x:.2f}" for x in v)
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    for row in rows:
        table.add_row(*[fmt(row.get(key)) for key in COLUMNS])
    console = Console()
    if not console.is_terminal:  # a log file or pipe: do not squeeze the table into 80 columns
        console = Console(width=200)
    console.print(table)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="lightning-mtp bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="artefact directory or zoo name")
    parser.add_argument("--prompts", default="tiny-math", help="'tiny-math' or a JSONL file with a 'prompt' field")
    parser.add_argument("--n", type=int, default=50, help="number of prompts")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per prompt and decoder (median kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    prompts, answers = load_prompts(args.prompts, args.n)
    if args.threads:
        torch.set_num_threads(args.threads)
    from lightning_mtp.module import MTPModule

    module = MTPModule.from_pretrained(args.model)
    rows = run_bench(module, prompts, answers, max_new_tokens=args.max_new_tokens, repeats=args.repeats)
    print_table(rows)
    if args.json:
        from lightning_mtp.artifacts import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(rows, indent=2) + "\n")
    return rows
