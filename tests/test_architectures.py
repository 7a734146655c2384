"""The architecture sweep (see tests/arch_sweep.py): every causal LM transformers registers, every method, greedy,
batched and sampled; and docs/architectures.md is the matrix this run produces."""

from __future__ import annotations

import pytest
import transformers
from arch_sweep import DOC, KNOWN_FAILURES, architectures, render, sweep_one

ARCHS = [pytest.param(a, marks=pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[a])) if a in KNOWN_FAILURES else a
         for a in architectures()]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_method_decodes_the_architecture_losslessly(arch):
    result = sweep_one(arch)
    if result.skipped is not None:
        pytest.skip(result.skipped)
    assert result.build_error is None, f"the tiny {arch} could not be built (add an override): {result.build_error}"
    failures = {name: m.failures for name, m in result.methods.items() if m.failures}
    assert not failures


def test_the_support_matrix_page_is_current():
    # the page as it reads when every check passes (the test above fails otherwise): building each architecture and
    # method is enough, so this test does not wait for the decoding tests, which may run in other workers
    page = render([sweep_one(arch, decode=False) for arch in architectures()])
    assert f"transformers {transformers.__version__}" in page
    assert DOC.read_text() == page, "docs/architectures.md is out of date: run `make architectures`"
