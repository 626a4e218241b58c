"""What the first GPU run must not find: graph breaks, recompiles after warm-up, an evaluation past its budget.

torch.compile runs here with dynamo's "eager" backend (the same capture, guards and recompiles as inductor,
without minutes of C++ compilation on 2 CPU cores).
"""

from __future__ import annotations

import functools

import pytest
import torch
from test_eval import TINY, needs_sample, noised_model, tiny_env  # noqa: F401  (the shared tiny eval setup)
from torch._dynamo.utils import counters

import train_gpt as tg


@pytest.fixture
def eager_compile(monkeypatch):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def explain(fn, *args):
    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args)


def test_compiled_paths_have_no_graph_breaks(tiny_settings, one_thread):
    s = tiny_settings()
    model = noised_model(s)
    x = torch.randint(0, 1024, (2, 128))
    H, fit = model.forward_hidden(x).detach(), torch.rand(2, 128) > 0.5
    for name, fn, args in (
        ("training loss (also the TTT step's loss)", model, (x, x)),
        ("eval hidden states", model.forward_hidden, (x,)),
        ("SLOT fit", tg.slot_delta, (model, H, x, fit, s, False)),
    ):
        ex = explain(fn, *args)
        assert ex.graph_break_count == 0 and ex.graph_count == 1, (name, ex.break_reasons)
    # The backward of the training loss compiles as one graph too (AOTAutograd through fullgraph=True).
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    compiled(x, x).backward()
    torch._dynamo.reset()


@needs_sample
@pytest.mark.slow
def test_phased_chunk_compiles_whole_with_dynamic_shapes(tmp_path, one_thread):
    """Phased TTT's chunk step (compiled dynamic=True on CUDA): adapters, and causal SLOT's fit inside it, in one
    graph (fullgraph: a break is an error); its backward through AOTAutograd gives the adapters' eager gradients.
    2 layers, the second looped and in two lanes, to keep the compile short."""
    from test_phased_ttt import setup

    s, run, model, luts = setup(tmp_path, NUM_LAYERS=2, LOOP_START=1, LOOP_END=1, PARALLEL_START_LAYER=1, XSA_LAST_N=2)
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    adapters = {
        k: (torch.rand(2, 4, i, generator=g).requires_grad_(), torch.randn(2, o, 4, generator=g).requires_grad_())
        for k, i, o in tg.lora_shapes(model, s)
    }
    lora = tg.LoRA(adapters, s.ttt_lora_alpha / s.ttt_lora_rank)
    x, y = torch.randint(2, 1024, (2, 2, 24), generator=g)
    at, fit = torch.arange(8).repeat(2, 1) + 10, torch.arange(24) < torch.tensor([[10], [5]])
    grads = []
    for fn in (tg.chunk_nll, torch.compile(tg.chunk_nll, backend="aot_eager", dynamic=True, fullgraph=True)):
        nll = fn(model, x, y, at, lora, fit, s)[1]
        grads.append(torch.autograd.grad(nll.sum(), [adapters["q0"][0], adapters["head"][1]]) + (nll.detach(),))
    torch._dynamo.reset()
    for eager, compiled in zip(*grads):
        assert eager.abs().max() > 0
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


@needs_sample
def test_evaluation_compiles_once_and_never_again(tmp_path, eager_compile, one_thread):
    s = tg.parse_settings(
        tiny_env(OUTPUT_DIR=tmp_path, COMPILE=1, VAL_MAX_TOKENS=1100, TTT_CHUNK_TOKENS=512, TTT_BATCH_SEQS=3)
    )
    run = tg.Run(s)
    luts = tg.build_sentencepiece_luts(tg.load_tokenizer(s), s.vocab_size, run.device)
    val = tg.load_validation_tokens(s.data_path + "/fineweb_val_*.bin", s.eval_seq_len, s.val_max_tokens)
    model = noised_model(s)
    # 1,100 tokens in 512-token chunks: batches of windows of every size from 1 to 8, and TTT batches of 3 and 1
    # sequences (4 per chunk): warm-up sees every shape the evaluation has.
    kw = dict(stride=s.eval_stride, ttt=True, slot=True)
    first = tg.evaluate(model, run, val, luts, **kw)
    graphs = counters["stats"]["unique_graphs"]
    # One graph for the scoring batches ([EVAL_BATCH_SEQS, EVAL_SEQ_LEN], padded), one for the SLOT fit, and one per
    # TTT batch shape ([3, 128], and [1, 128] for the last batch of each chunk): not one per number of windows.
    assert graphs == 4 and not counters["graph_break"], (graphs, dict(counters["graph_break"]))
    model.load_state_dict(noised_model(s, seed=1).state_dict())
    second = tg.evaluate(model, run, val, luts, **kw)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing recompiled after warm-up
    assert not counters["recompiles"] and first != second


def test_default_passes_leave_out_the_standalone_sliding_pass(tiny_settings):
    labels = lambda **kw: [label for label, _ in tg.eval_paths(tiny_settings(EVAL_STRIDE=32, **kw))]
    assert labels(TTT_ENABLED=1, SLOT_ENABLED=1) == ["final_int6_roundtrip", "legal_ttt"]
    assert labels(TTT_ENABLED=0, SLOT_ENABLED=1) == ["final_int6_roundtrip", "slot_sliding_window"]
    assert labels(TTT_ENABLED=1, EVAL_SLIDING_PASS=1) == [
        "final_int6_roundtrip",
        "final_int6_sliding_window",
        "legal_ttt",
    ]
    # Without TTT and SLOT the sliding pass is the final one.
    assert labels(TTT_ENABLED=0, SLOT_ENABLED=0) == ["final_int6_roundtrip", "final_int6_sliding_window"]
    # With phased TTT, SLOT runs inside its pass: no SLOT-only pass, so the sliding pass stays.
    phased = [
        (label, kw["slot"])
        for label, kw in tg.eval_paths(
            tiny_settings(EVAL_STRIDE=32, TTT_ENABLED=0, SLOT_ENABLED=1, PHASED_TTT_ENABLED=1)
        )
    ]
    assert phased == [
        ("final_int6_roundtrip", False),
        ("final_int6_sliding_window", False),
        ("quantized_ttt_phased", True),
    ]


@needs_sample
def test_budget_overrun_is_said_early_in_the_pass(tmp_path, monkeypatch, one_thread):
    s = tg.parse_settings(tiny_env(OUTPUT_DIR=tmp_path, EVAL_BUDGET_SECONDS=0.001, VAL_MAX_TOKENS=1024))
    run = tg.Run(s)
    luts = tg.build_sentencepiece_luts(tg.load_tokenizer(s), s.vocab_size, run.device)
    val = tg.load_validation_tokens(s.data_path + "/fineweb_val_*.bin", s.eval_seq_len, s.val_max_tokens)
    lines, chunks = [], []
    monkeypatch.setattr(run, "log", lambda msg, console=True: lines.append(msg))
    train_chunk = tg.ttt_train_chunk
    monkeypatch.setattr(tg, "ttt_train_chunk", lambda *a: chunks.append(len(lines)) or train_chunk(*a))
    tg.final_evaluation(run, noised_model(s), val, luts, None)
    n_chunks = (val.numel() - 2) // 256 + 1
    projected = [i for i, ln in enumerate(lines) if ln.startswith("legal_ttt_projected_seconds:")]
    loud = [i for i, ln in enumerate(lines) if ln.startswith("!!! EVAL BUDGET: legal_ttt")]
    done = next(i for i, ln in enumerate(lines) if ln.startswith("legal_ttt val_loss:"))
    # Said once, right after the third chunk, long before the pass ends; then the final lines as usual.
    assert len(projected) == 1 and loud == [projected[0] + 1] and n_chunks == 4
    assert chunks[2] <= projected[0] < done and projected[0] < next(
        i for i, ln in enumerate(lines) if "_chunk:4/4" in ln
    )
    assert any(ln.startswith("final_int6_roundtrip_projected_seconds:") for ln in lines)
    secs = float(next(ln for ln in lines if ln.startswith("final_eval_seconds:")).split()[0].split(":")[1])
    assert secs == pytest.approx(run.summary["final_eval_seconds"], abs=0.05) and secs > 0


def test_pr1855_compiles_both_loop_graphs_in_warm_up_and_never_again(tiny_settings, eager_compile, one_thread):
    from test_pr1855 import TINY_PR, noised

    s = tiny_settings(**TINY_PR)
    model = noised(tg.GPT(tg.ModelConfig.of(s)))
    x = torch.randint(0, 1024, (1, 256))
    x[0, [0, 50, 51, 200]] = tg.BOS_ID
    for looping in (False, True):  # whole graphs: the document mask, both lanes, the gates
        model.looping = looping
        for fn, args in ((model, (x, x)), (model.forward_hidden, (x,))):
            ex = explain(fn, *args)
            assert ex.graph_break_count == 0 and ex.graph_count == 1, (looping, ex.break_reasons)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    for looping in (False, True):  # what train()'s warm-up runs
        model.looping = looping
        compiled(x, x).backward()
    graphs, recompiles = counters["stats"]["unique_graphs"], sum(counters["recompiles"].values())
    assert graphs == 2
    for looping, piece in ((False, 64), (True, 32), (False, 256), (True, 128)):  # training switches the loop on
        model.looping = looping  # and TRAIN_SEQ_SCHEDULE the piece length: nothing compiles again
        model.piece_len.fill_(piece)
        other = torch.randint(0, 1024, (1, 256))
        compiled(other, other).backward()
    assert counters["stats"]["unique_graphs"] == graphs and sum(counters["recompiles"].values()) == recompiles
