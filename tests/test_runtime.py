import os
import signal
import sys

import pytest
import torch
import torch.nn.functional as F

import runtime
from runtime import Interrupted, Runtime, amp_dtype, get_device, signals_interrupt
from utils import UsageError


def test_precision_names_map_to_autocast_dtypes_and_fp16_needs_a_gpu(monkeypatch, capsys):
    cpu = torch.device("cpu")
    assert amp_dtype("fp32", cpu) is None
    with pytest.raises(UsageError, match="--dtype fp16 needs --use_gpu"):
        amp_dtype("fp16", cpu)
    monkeypatch.setattr(runtime, "cpu_has_bf16_matmul", lambda: False)
    assert amp_dtype("bf16", cpu) is torch.bfloat16
    assert "no bf16 matrix instructions" in capsys.readouterr().err
    monkeypatch.setattr(runtime, "cpu_has_bf16_matmul", lambda: True)
    amp_dtype("bf16", cpu)
    assert capsys.readouterr().err == ""


def test_autocast_computes_in_the_chosen_precision_and_fp32_is_plain():
    x = torch.randn(4, 4)
    with Runtime(torch.device("cpu"), torch.bfloat16).autocast():
        assert (x @ x).dtype == torch.bfloat16
    with Runtime(torch.device("cpu")).autocast():
        assert (x @ x).dtype == torch.float32


def test_one_process_sums_and_gathers_its_own_values():
    one = Runtime(torch.device("cpu"))
    assert one.is_main and one.sum(2.5) == 2.5 and one.gather({"a": 1}) == [{"a": 1}]


def test_progress_bars_show_on_rank_zero_s_terminal_only(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert not Runtime(torch.device("cpu"), rank=0, world_size=2).progress(range(3), "x").disable
    assert Runtime(torch.device("cpu"), rank=1, world_size=2).progress(range(3), "x").disable
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)  # a log: 2>&1 | tee run.log
    assert Runtime(torch.device("cpu"), rank=0, world_size=2).progress(range(3), "x").disable


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_become_interrupted_inside_the_block_only(signum, status):
    before = signal.getsignal(signum)
    with pytest.raises(Interrupted) as stop:
        with signals_interrupt():
            os.kill(os.getpid(), signum)
    assert stop.value.status == status and str(stop.value) == signal.Signals(signum).name
    assert not stop.value.resumable
    assert signal.getsignal(signum) is before


def test_use_gpu_without_one_is_a_usage_error(monkeypatch):
    assert get_device(False) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UsageError, match="--use_gpu: no CUDA"):
        get_device(True)


def test_auto_precision_follows_the_stored_one_where_the_device_multiplies_it(monkeypatch, capsys):
    import runtime
    from runtime import resolve_dtype

    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_has_bf16_matmul", lambda: True)
    assert [resolve_dtype("auto", stored, "m is stored in", cpu) for stored in ("bf16", "fp32", None)] == \
        ["bf16", "fp32", "fp32"]
    assert resolve_dtype("fp32", "bf16", "m is stored in", cpu) == "fp32"
    assert capsys.readouterr().err == ""
    assert resolve_dtype("auto", "fp16", "m is stored in", cpu) == "fp32"
    assert "note: m is stored in fp16, which needs a GPU; running in fp32" in capsys.readouterr().err
    monkeypatch.setattr(runtime, "cpu_has_bf16_matmul", lambda: False)
    assert resolve_dtype("auto", "bf16", "m is stored in", cpu) == "fp32"
    assert ("m is stored in bf16, which this CPU has no instructions for; --dtype bf16 holds the weights in half "
            "the memory; running in fp32") in capsys.readouterr().err



@pytest.mark.parametrize("native", [False, True])
def test_a_bf16_run_takes_fp32_kernels_on_a_cpu_without_bf16_instructions_only(native, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_bf16_matmul", lambda: native)
    bf16, fp32 = Runtime(torch.device("cpu"), torch.bfloat16), Runtime(torch.device("cpu"))
    x, weight = torch.randn(2, 8, requires_grad=True), torch.randn(4, 8).bfloat16()
    with bf16.autocast():
        out = F.linear(x, weight)
        assert torch.is_autocast_enabled("cpu")
    assert (out.grad_fn.name() == "Bf16ProductBackward") == (not native) and out.dtype == torch.bfloat16
    assert bf16.bf16_in_fp32_kernels == (not native) and not fp32.bf16_in_fp32_kernels
