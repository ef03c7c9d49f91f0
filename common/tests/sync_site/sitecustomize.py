"""Counts host-device synchronisations per training iteration in a real training process (tests only).

With MODELZOO_SYNC_SKIP_ON_DEVICE=1 the run decides skipped steps on the device, as on CUDA.

On PYTHONPATH with MODELZOO_SYNC_COUNT_OUT=<file>, a process that trains through `common.engine` counts,
with `common.sync_counter.SyncCounter`, the synchronising ops between the starts of consecutive training
steps of an epoch: the whole iteration (step, loss bookkeeping, training metrics, fetching the next
batch) except the optimizer's own update, whose internals are not ours (torch's global optimizer-step
hooks pause the count), and the loading of the next batch, which works on host tensors. The last iteration of each epoch is not measured: it is a logging step. At exit
the per-iteration counts go to the file as JSON.
"""

from __future__ import annotations

import os

_OUT = os.environ.get("MODELZOO_SYNC_COUNT_OUT")


def _install(out: str) -> None:
    import atexit
    import importlib.abc
    import importlib.machinery
    import json
    import sys

    # Only a training process imports the engine (the scripts' other commands, device count and demo
    # data, never do), so the hooks go in when it is first imported.
    state = {"counter": None, "last": None, "excluded": 0, "epochs": [[]]}

    def wrap(engine) -> None:
        from common.sync_counter import SyncCounter

        if os.environ.get("MODELZOO_SYNC_SKIP_ON_DEVICE") == "1":
            # As on CUDA: skipped steps decided on the device wherever the optimizer takes the verdict.
            import common.amp

            init = common.amp.MixedPrecision.__init__

            def init_skipping_on_device(self, *args, **kwargs):
                kwargs.setdefault("skip_on_device", True)
                init(self, *args, **kwargs)

            common.amp.MixedPrecision.__init__ = init_skipping_on_device

        original_step, original_epoch = engine.train_step, engine.train_one_epoch

        def total() -> int:
            return state["counter"].total - state["excluded"]

        def train_step(*args, **kwargs):
            if state["counter"] is None:
                state["counter"] = SyncCounter().__enter__()
            now = total()
            if state["last"] is not None:
                state["epochs"][-1].append(now - state["last"])
            state["last"] = now
            return original_step(*args, **kwargs)

        def train_one_epoch(*args, **kwargs):
            state["last"] = None
            state["epochs"].append([])
            return original_epoch(*args, **kwargs)

        paused = {}

        def before(optimizer, args, kwargs):
            if state["counter"] is not None:
                paused["at"] = state["counter"].total

        def after(optimizer, args, kwargs):
            if state["counter"] is not None and "at" in paused:
                state["excluded"] += state["counter"].total - paused.pop("at")

        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        register_optimizer_step_pre_hook(before)
        register_optimizer_step_post_hook(after)

        # Loading a batch works on host tensors (in worker processes, or here with --workers=0): not a wait
        # for the device, though the CPU cannot tell host from device tensors apart.
        from torch.utils.data.dataloader import _BaseDataLoaderIter

        original_next = _BaseDataLoaderIter.__next__

        def next_batch(self):
            at = state["counter"].total if state["counter"] is not None else None
            try:
                return original_next(self)
            finally:
                if at is not None:
                    state["excluded"] += state["counter"].total - at

        _BaseDataLoaderIter.__next__ = next_batch
        engine.train_step, engine.train_one_epoch = train_step, train_one_epoch

        def dump() -> None:
            counter = state["counter"]
            report = {"epochs": [e for e in state["epochs"] if e],
                      "by_op": counter.by_op if counter is not None else {},
                      "sites": [" ".join(site) for site in counter.sites[:200]] if counter is not None else []}  # fmt: skip
            with open(out, "w") as handle:
                json.dump(report, handle)

        atexit.register(dump)

    class Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "common.engine":
                return None
            sys.meta_path.remove(self)
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            loader = spec.loader
            exec_module = loader.exec_module

            def exec_and_wrap(module):
                exec_module(module)
                wrap(module)

            loader.exec_module = exec_and_wrap
            return spec

    sys.meta_path.insert(0, Hook())


if _OUT:
    _install(_OUT)
