"""A model load, or a gate run's imports, in the build process never overlaps other torch work: from_pretrained
changes torch's default dtype while it builds a model, and the streaming quantizer once wrote a bfloat16 `quant_map`
because of it (H200); two threads importing torch's modules at once once saw one half initialized (CPU)."""

from __future__ import annotations

import threading
import time

import torch

from builder.steps import torch_defaults


def test_work_under_shared_never_sees_a_loads_default_dtype():
    loading, seen = threading.Event(), []

    def load():
        with torch_defaults.exclusive():
            torch.set_default_dtype(torch.bfloat16)  # what from_pretrained does while it builds a bf16 model
            loading.set()
            time.sleep(0.3)
            torch.set_default_dtype(torch.float32)

    def work():
        loading.wait()
        with torch_defaults.shared():
            seen.append(torch.zeros(1).dtype)

    threads = [threading.Thread(target=load), threading.Thread(target=work)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == [torch.float32]


def test_a_waiting_load_goes_before_new_shared_work():
    order, first_in, load_waiting = [], threading.Event(), threading.Event()

    def long_step():
        with torch_defaults.shared():
            first_in.set()
            load_waiting.wait()
            time.sleep(0.2)
            order.append("step")

    def load():
        first_in.wait()
        load_waiting.set()
        with torch_defaults.exclusive():
            order.append("load")

    def next_step():
        load_waiting.wait()
        time.sleep(0.1)  # arrives while the load waits for the first step
        with torch_defaults.shared():
            order.append("next step")

    threads = [threading.Thread(target=f) for f in (long_step, load, next_step)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert order == ["step", "load", "next step"]


def test_a_gate_run_in_the_build_process_imports_only_while_nothing_else_holds_the_defaults(monkeypatch, tmp_path):
    # Two threads importing torch's modules at once failed a fresh `builder build` (a half-initialized
    # torch._inductor.utils): a run's imports wait, like a load, for the quantize step.
    from builder.steps import metrics, runs

    imported = threading.Event()
    monkeypatch.setattr(metrics, "import_for", lambda *args: imported.set())
    with torch_defaults.exclusive():  # the quantize step
        run = runs.InProcessRun(tmp_path, "text-generation", "cpu", "x: verify: candidate")
        assert not imported.wait(0.3)
    assert imported.wait(10)
    run.cancel()
    assert set(run.stages) == {"imports"}
