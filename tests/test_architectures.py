"""The architecture sweep (see tests/arch_sweep.py): every causal LM transformers registers, every method, greedy,
batched and sampled; and docs/architectures.md is the matrix this run produces."""

from __future__ import annotations

import pytest
from arch_sweep import DOC, KNOWN_FAILURES, architectures, header, render_row, sweep_one

PAGE = DOC.read_text() if DOC.is_file() else ""
ARCHS = [pytest.param(a, marks=pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[a]))
         if a in KNOWN_FAILURES else a for a in architectures()]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_method_decodes_the_architecture_losslessly(arch):
    result = sweep_one(arch)
    assert render_row(result) in PAGE.splitlines(), f"docs/architectures.md is out of date for {arch}: run `make architectures`"
    if result.skipped is not None:
        pytest.skip(result.skipped)
    assert result.build_error is None, f"the tiny {arch} could not be built (add an override): {result.build_error}"
    failures = {name: m.failures for name, m in result.methods.items() if m.failures}
    assert not failures


def test_the_support_matrix_lists_every_architecture_in_order():
    # each architecture's row is checked by its test above; here the page itself: header and the set of rows
    lines = PAGE.splitlines()
    assert lines[: len(header())] == header(), "docs/architectures.md is out of date: run `make architectures`"
    listed = [line.split("`")[1] for line in lines[len(header()) :] if line.startswith("| `")]
    assert listed == architectures()
