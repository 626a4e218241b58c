"""ATTN_BACKEND's chain (auto: FA3 installed, FA3 from the Hub through `kernels`, FA2, then PyTorch's), driven on the
CPU with stand-in kernel modules: which backend each situation picks, and the reason logged for each one passed over.
The stand-ins compute attention with plain torch, so the picked functions are also checked for their numbers."""

from __future__ import annotations

import sys
import threading
import time
import types

import pytest
import torch

import train_gpt as tg

CUDA, CPU = torch.device("cuda"), torch.device("cpu")  # no CUDA call is made while picking: a CPU can pretend
HOPPER, AMPERE = (lambda d: (9, 0)), (lambda d: (8, 0))


def reference_attention(q, k, v):
    """Causal attention of [B, T, H, D] tensors, written out (the contract of flash_attn_func)."""
    T, groups = q.size(1), q.size(2) // k.size(2)
    k, v = (t.repeat_interleave(groups, dim=2) for t in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.size(-1) ** 0.5
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def stand_in_flash(tag, returns_tuple):
    """A module with FlashAttention's two entry points; flash_attn_func marks the calls with its tag."""
    calls = []

    def flash_attn_func(q, k, v, causal):
        assert causal
        calls.append(tag)
        y = reference_attention(q, k, v)
        return (y, None) if returns_tuple else y

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal):
        out = torch.zeros_like(q)
        for a, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            if e > a:
                out[a:e] = reference_attention(q[None, a:e], k[None, a:e], v[None, a:e])[0]
        return (out, None) if returns_tuple else out

    module = types.SimpleNamespace(flash_attn_func=flash_attn_func, flash_attn_varlen_func=flash_attn_varlen_func)
    return module, calls


def stand_in_kernels(behaviour, fa3_module=None):
    """The `kernels` package: get_kernel answers (a module with flash_attn_interface), raises, or never returns."""
    asked, never = [], threading.Event()

    def get_kernel(repo):
        asked.append(repo)
        if behaviour == "hangs":
            never.wait(30)  # a Hub that does not answer (released at the end of the test)
        if behaviour == "raises":
            raise ConnectionError("Cannot reach https://huggingface.co\nsecond line")
        return types.SimpleNamespace(flash_attn_interface=fa3_module)

    return types.SimpleNamespace(get_kernel=get_kernel), asked, never


@pytest.fixture
def modules(monkeypatch):
    """install(name, module): put a stand-in in sys.modules; None there makes the import fail (not installed).
    Every name starts as not installed, whatever this machine has."""
    names = ("flash_attn_interface", "flash_attn", "kernels")
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)
    return lambda name, module: monkeypatch.setitem(sys.modules, name, module)


def settings(tiny_settings, **over):
    return tiny_settings(**{"ATTN_HUB_TIMEOUT_SECONDS": "5", **over})


def test_auto_takes_each_backend_in_turn_and_says_why_it_passed_over_the_faster_ones(modules, tiny_settings):
    s = settings(tiny_settings)
    fa3, fa3_calls = stand_in_flash("fa3", returns_tuple=True)
    hub_fa3, hub_calls = stand_in_flash("hub", returns_tuple=True)
    fa2, fa2_calls = stand_in_flash("fa2", returns_tuple=False)
    kernels, asked, _ = stand_in_kernels("answers", hub_fa3)
    modules("flash_attn_interface", fa3)
    modules("kernels", kernels)
    modules("flash_attn", fa2)

    a = tg.pick_attention(s, CUDA, HOPPER)
    assert (a.name, a.source, a.documents_name, a.passed_over) == ("fa3", "installed", "fa3 varlen", [])
    assert asked == []  # the Hub is not asked when FA3 is installed

    modules("flash_attn_interface", None)
    a = tg.pick_attention(s, CUDA, HOPPER)
    assert (a.name, a.source) == ("fa3", "kernels hub varunneal/flash-attention-3")
    assert asked == ["varunneal/flash-attention-3"]
    assert len(a.passed_over) == 1 and a.passed_over[0].startswith(
        "fa3 (installed): import flash_attn_interface failed ("
    )

    modules("kernels", None)
    a = tg.pick_attention(s, CUDA, HOPPER)
    assert (a.name, a.source, a.documents_name) == ("fa2", "installed", "fa2 varlen")
    assert a.passed_over[1] == (
        "fa3 (kernels hub varunneal/flash-attention-3): the kernels package is not installed (pip install kernels)"
    )

    modules("flash_attn", None)
    a = tg.pick_attention(s, CUDA, HOPPER)
    assert (a.name, a.source, a.documents_name) == ("sdpa", "torch", "flex_attention")
    assert [why.split(":")[0] for why in a.passed_over] == [
        "fa3 (installed)",
        "fa3 (kernels hub varunneal/flash-attention-3)",
        "fa2 (installed)",
    ]

    # The functions picked are the stand-ins', outputs unwrapped from their tuples: the numbers of plain attention.
    modules("flash_attn_interface", fa3)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 12, h, 8, generator=g) for h in (4, 2, 2))
    a = tg.pick_attention(s, CUDA, HOPPER)
    torch.testing.assert_close(a.dense(q, k, v), reference_attention(q, k, v))
    assert fa3_calls == ["fa3"] and hub_calls == fa2_calls == []
    idx = torch.randint(2, 50, (2, 12), generator=g)
    idx[0, 5] = tg.BOS_ID
    seg = tg.doc_segments(idx, 12)
    torch.testing.assert_close(a.documents(q, k, v, seg), tg.sdpa(q, k, v, seg), atol=1e-6, rtol=1e-6)


def test_fa3_needs_a_hopper_gpu_and_every_backend_needs_cuda(modules, tiny_settings):
    s = settings(tiny_settings)
    fa3, _ = stand_in_flash("fa3", returns_tuple=True)
    fa2, _ = stand_in_flash("fa2", returns_tuple=False)
    modules("flash_attn_interface", fa3)
    modules("flash_attn", fa2)
    a = tg.pick_attention(s, CUDA, AMPERE)
    assert a.name == "fa2"
    assert a.passed_over[0] == "fa3 (installed): FA3 runs on Hopper GPUs only (compute capability 9.x; this one is 8.x)"
    a = tg.pick_attention(s, CPU)
    assert (a.name, a.documents) == ("sdpa", tg.segment_sdpa)
    assert len(a.passed_over) == 3 and all(why.endswith(": needs a CUDA device") for why in a.passed_over)


def test_a_hub_that_does_not_answer_costs_a_bounded_wait_then_falls_back(modules, tiny_settings):
    s = settings(tiny_settings, ATTN_HUB_TIMEOUT_SECONDS="0.3")
    kernels, asked, never = stand_in_kernels("hangs")
    modules("kernels", kernels)
    try:
        t0 = time.perf_counter()
        a = tg.pick_attention(s, CUDA, HOPPER)
        waited = time.perf_counter() - t0
    finally:
        never.set()
    assert asked == ["varunneal/flash-attention-3"]
    assert 0.3 <= waited < 5
    assert a.name == "sdpa"
    assert a.passed_over[1] == (
        "fa3 (kernels hub varunneal/flash-attention-3): the Hub did not answer for varunneal/flash-attention-3 "
        "within 0.3 s (ATTN_HUB_TIMEOUT_SECONDS)"
    )


def test_a_hub_error_and_an_empty_repo_fall_back_with_their_reason(modules, tiny_settings):
    kernels, asked, _ = stand_in_kernels("raises")
    modules("kernels", kernels)
    a = tg.pick_attention(settings(tiny_settings), CUDA, HOPPER)
    assert a.name == "sdpa"
    assert a.passed_over[1].endswith(
        "kernels.get_kernel('varunneal/flash-attention-3') failed: ConnectionError: Cannot reach https://huggingface.co"
    )
    a = tg.pick_attention(settings(tiny_settings, ATTN_KERNEL_REPO=""), CUDA, HOPPER)
    assert a.passed_over[1] == "fa3 (kernels hub): ATTN_KERNEL_REPO is empty" and len(asked) == 1


def test_an_asked_for_backend_is_that_one_or_a_one_line_error(modules, tiny_settings):
    fa3, _ = stand_in_flash("fa3", returns_tuple=True)
    fa2, _ = stand_in_flash("fa2", returns_tuple=False)
    modules("flash_attn_interface", fa3)
    modules("flash_attn", fa2)
    a = tg.pick_attention(settings(tiny_settings, ATTN_BACKEND="fa2"), CUDA, HOPPER)
    assert (a.name, a.passed_over) == ("fa2", [])  # fa3 is there, but not asked for
    assert tg.pick_attention(settings(tiny_settings, ATTN_BACKEND="sdpa"), CUDA, HOPPER).name == "sdpa"
    modules("flash_attn_interface", None)
    with pytest.raises(tg.Fail) as e:
        tg.pick_attention(settings(tiny_settings, ATTN_BACKEND="fa3"), CUDA, HOPPER)
    message = str(e.value)
    assert "\n" not in message and message.startswith("ATTN_BACKEND=fa3 cannot run here: fa3 (installed): ")
    assert "the kernels package is not installed" in message and message.endswith("; use sdpa or auto")


def test_ranks_that_picked_different_backends_are_refused_in_one_line():
    tg.check_same_attention(["fa3 (installed)"] * 8)
    picked = ["fa3 (kernels hub r)"] * 3 + ["sdpa (torch)"] + ["fa3 (kernels hub r)"] * 4
    with pytest.raises(tg.Fail) as e:
        tg.check_same_attention(picked)
    assert str(e.value) == (
        "the ranks picked different attention backends (fa3 (kernels hub r) on rank 0,1,2,4,5,6,7; sdpa (torch) on "
        "rank 3); run again (a Hub kernel is cached once loaded), or set ATTN_BACKEND for all"
    )
