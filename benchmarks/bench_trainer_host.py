# Copyright (c) monai_condflow contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Host time of the flow trainer around its model: what a CUDA-graphed GPU step still waits for.

On a GPU with ``cuda_graphs`` the forward and backward are two graph replays; what the host does besides (the engine's
events, the train-mode switch, the parameter list, clipping, the guard, the EMA update, the stats and TensorBoard
handlers, fetching the next batch) runs between them, and each wait of the step for the device (``.item()``) leaves
the GPU idle while the host does it. This benchmark measures that host time on the CPU, where it can be separated
from the model: the wall time of every iteration minus the time spent inside the network's forward, the backward
pass, the optimiser's step and the classifier's embedding of the batch (the parts that are kernels on a GPU; the
frozen classifier runs eagerly there). The model has the module structure of a preset (``--preset``) and tiny
widths (``--hidden``), as the host work scales with the number of modules and parameter tensors, not their size.

For each alternating repetition, with a fresh model:

- ``ours``: the bundle's flow trainer (:func:`create_flow_trainer`: EMA, TensorBoard, stats every ``--log-every``
  iterations, the warm-up schedule, the classifier computing the condition of each batch);
- ``peer``: MONAI's plain ``SupervisedTrainer`` (its defaults: the output decollated, which its handlers'
  ``from_engine(["loss"], first=True)`` expects; the decollation reads the loss and every label and prediction)
  with the same network (:class:`FlowBitsPerDim`), optimiser, schedule, prepare-batch, EMA and the same stats (every
  ``--log-every`` iterations) / TensorBoard / schedule handlers (no clipping, no guard).

Each trainer runs 2 epochs of ``--iters`` iterations; the second epoch is measured: the median iteration and the
median host time per iteration. A separate run of each counts, in its second epoch, the calls that copy a tensor's
value to the host (``item``, ``tolist``, ``bool``, ``float``, ``int``) per iteration, and how many of those read a
tensor that was not made by the host from a number (on a GPU, such a read waits for the device). Then the flow
stage's training loader on its own (:func:`bench_loader`: ``--loader-batch`` images of ``--size`` px per batch,
``copy_cache`` false as the bundle has it against MONAI's default, and the dequantisation's NumPy path against the
torch ops). Last line ``BENCH_TRAINER_HOST {json}``.

Usage::

    python benchmarks/bench_trainer_host.py --preset paper --hidden 4 --batch 2 --iters 20 --reps 5
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monai_condflow.engines.ema import ModelEMA  # noqa: E402
from monai_condflow.engines.flow import FlowBitsPerDim, _mean_loss, warmup_exponential_lambda  # noqa: E402
from monai_condflow.engines.flow_trainer import create_flow_trainer  # noqa: E402
from monai_condflow.engines.prepare_batch import ConditionPrepareBatch  # noqa: E402
from monai_condflow.networks.nets.conditional_glow import ConditionalGlow  # noqa: E402
from monai_condflow.networks.nets.pepx_net import PEPXNet  # noqa: E402
from monai_condflow.utils.distributed import create_loader  # noqa: E402

HOST_COPIES = frozenset({"item", "tolist", "__bool__", "__float__", "__int__", "__index__"})


class HostCopies(TorchFunctionMode):
    """Counts the calls that copy a tensor's value to the host while :attr:`on`, and those among them whose tensor
    is the result of an operation (``grad_fn``) or was made under autograd's no-grad by the model, i.e. not a
    0-d CPU tensor the host made from a number (``torch.tensor(x)``): the latter is free on any device."""

    def __init__(self) -> None:
        super().__init__()
        self.on = False
        self.calls = 0
        self.device_reads = 0
        self.host_made: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name == "tensor" and isinstance(out, torch.Tensor) and out.ndim == 0:
            self.host_made[id(out)] = out  # made from a Python number by the host
        if self.on and name in HOST_COPIES and args and isinstance(args[0], torch.Tensor):
            self.calls += 1
            if self.host_made.get(id(args[0])) is not args[0]:
                self.device_reads += 1
        return out


def process_state() -> tuple:
    """What the trainers change for the whole process: the thread count, cuDNN's flags and every random generator
    (``set_determinism``, which ``create_flow_trainer`` calls, seeds them and makes cuDNN deterministic)."""
    import random

    import numpy as np
    from monai.utils import get_seed

    return (torch.get_num_threads(), torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
            random.getstate(), np.random.get_state(), torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None, get_seed())  # fmt: skip


def restore(state: tuple) -> None:
    """Put back what :func:`process_state` saved."""
    import random

    import monai.utils.misc
    import numpy as np

    torch.set_num_threads(state[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = state[1], state[2]
    random.setstate(state[3])
    np.random.set_state(state[4])
    torch.set_rng_state(state[5])
    if state[6] is not None:
        torch.cuda.set_rng_state_all(state[6])
    monai.utils.misc._seed = state[7]


def make_data(n: int, size: int, seed: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(n, 1, size, size, generator=g) * 255).round() / 256 + 0.5 / 256
    return [{"image": images[i], "label": i % 2} for i in range(n)]


def make_flow(args: argparse.Namespace, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ConditionalGlow.from_preset(args.preset, image_size=args.size, hidden_channels=args.hidden)


class ModelTime:
    """Accumulates the wall time spent inside the model's parts (:attr:`seconds`): the network's forward, every
    backward pass, the optimiser's step and the classifier's ``embed``; the rest of an iteration is host work."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        return timed

    def attach(self, network: torch.nn.Module, optimizer: torch.optim.Optimizer, classifier: torch.nn.Module) -> None:
        network.forward = self.wrap(network.forward)
        classifier.embed = self.wrap(classifier.embed)
        started: list[float] = []  # the step's own hooks (replacing ``step`` would upset the schedule's check)
        optimizer.register_step_pre_hook(lambda *a: started.append(time.perf_counter()))

        def stepped(*args: Any) -> None:
            self.seconds += time.perf_counter() - started.pop()

        optimizer.register_step_post_hook(stepped)


def time_epochs(trainer: Any, iters: int, clock: ModelTime, counter: HostCopies | None = None) -> tuple:
    """Run 2 epochs: the second epoch's median iteration and median host time per iteration (s), and with
    ``counter`` (which slows every operation down: a separate run) its host copies per iteration (all, device
    reads)."""
    from ignite.engine import Events

    marks: list[tuple[float, float]] = []

    def mark(engine: Any) -> None:
        marks.append((time.perf_counter(), clock.seconds))

    trainer.add_event_handler(Events.ITERATION_STARTED, mark)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, mark)
    backward = torch.autograd.backward
    torch.autograd.backward = clock.wrap(backward)
    try:
        if counter is None:
            trainer.run()
            calls = reads = float("nan")
        else:

            def switch(on: bool) -> None:
                counter.on = on

            trainer.add_event_handler(Events.EPOCH_STARTED(once=2), lambda e: switch(True))
            trainer.add_event_handler(Events.EPOCH_COMPLETED(once=2), lambda e: switch(False))
            with counter:
                trainer.run()
            calls, reads = counter.calls / iters, counter.device_reads / iters
    finally:
        torch.autograd.backward = backward
    second = marks[-(iters + 1) :]  # the second epoch's iteration starts and its end
    walls = [b[0] - a[0] for a, b in zip(second[:-1], second[1:])]
    hosts = [(b[0] - a[0]) - (b[1] - a[1]) for a, b in zip(second[:-1], second[1:])]
    return statistics.median(walls), statistics.median(hosts), calls, reads


def run_ours(args: argparse.Namespace, classifier: torch.nn.Module, data: list, folder: Path, rep: int,
             counter: HostCopies | None = None) -> tuple:
    loader = create_loader(data, args.batch, shuffle=True, seed=rep, drop_last=True)
    trainer, _ = create_flow_trainer(
        make_flow(args, rep), classifier, loader, None, device="cpu", max_epochs=2, output_dir=folder / f"ours{rep}",
        ema_decay=0.99, warmup_epochs=1, tensorboard=True, log_every=args.log_every, seed=rep,
    )  # fmt: skip
    clock = ModelTime()
    clock.attach(trainer.network, trainer.optimizer, classifier)
    try:
        return time_epochs(trainer, args.iters, clock, counter)
    finally:
        del classifier.embed  # the class's method again


def run_peer(args: argparse.Namespace, classifier: torch.nn.Module, data: list, folder: Path, rep: int,
             counter: HostCopies | None = None) -> tuple:
    from monai.engines import SupervisedTrainer
    from monai.handlers import LrScheduleHandler, StatsHandler, TensorBoardStatsHandler, from_engine
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(rep)
    loader = create_loader(data, args.batch, shuffle=True, seed=rep, drop_last=True)
    prepare = ConditionPrepareBatch(classifier)
    flow = make_flow(args, rep)
    x, _, (z,), _ = prepare(next(iter(loader)), "cpu")
    flow.initialize(x, z)
    opt = torch.optim.AdamW(flow.parameters(), lr=5e-4, weight_decay=1e-6, betas=(0.5, 0.999))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, warmup_exponential_lambda(len(loader), 1, 0.99))
    writer = SummaryWriter(log_dir=str(folder / f"peer{rep}"))
    loss = from_engine(["loss"], first=True)
    handlers = [
        LrScheduleHandler(schedule, print_lr=False, epoch_level=False),
        StatsHandler(tag_name="train_bpd", output_transform=loss,
                     iteration_log=lambda engine, iteration: iteration % args.log_every == 0),  # as train_flow.json
        TensorBoardStatsHandler(summary_writer=writer, tag_name="train_bpd", output_transform=loss),
    ]
    trainer = SupervisedTrainer(
        device="cpu", max_epochs=2, train_data_loader=loader, network=FlowBitsPerDim(flow), optimizer=opt,
        loss_function=_mean_loss, prepare_batch=prepare, train_handlers=handlers,
    )  # fmt: skip
    ModelEMA(flow, 0.99).attach(trainer)
    clock = ModelTime()
    clock.attach(trainer.network, opt, classifier)
    try:
        return time_epochs(trainer, args.iters, clock, counter)
    finally:
        del classifier.embed
        writer.close()


def dequantize_before(img: torch.Tensor, noise: Any, n_bits: int) -> torch.Tensor:
    """The peer: ``Dequantize.__call__``'s arithmetic before the twenty-fifth session, as it was (torch ops on the
    CPU, MONAI's type conversions around them), with the noise given."""
    import numpy as np
    from monai.utils import convert_data_type, convert_to_dst_type

    levels = 2**n_bits
    x, *_ = convert_data_type(img, torch.Tensor, dtype=torch.float32)
    q = torch.clamp(torch.round(x * (levels - 1)), 0, levels - 1)
    out = (q + torch.from_numpy(noise)) / levels
    out = torch.clamp(out, max=float(np.nextafter(np.float32(1), np.float32(0))))
    result, *_ = convert_to_dst_type(out, img, dtype=torch.float32 if isinstance(img, torch.Tensor) else np.float32)
    return result


def bench_loader(args: argparse.Namespace) -> dict:
    """The flow stage's training loader (``train_flow.json``'s ``train#dataset``: the array chain, then the
    dequantisation after the cache) per batch of ``--loader-batch`` images: ``copy_cache`` false (the bundle's)
    against MONAI's default ``true`` (a deep copy of every cached item at every draw), alternating epochs; and
    ``Dequantize`` of one image (its noise drawn beforehand) against its CPU path before the twenty-fifth session
    (:func:`dequantize_before`)."""
    import numpy as np
    from monai.data import CacheDataset

    from monai_condflow.transforms import get_array_transforms
    from monai_condflow.transforms.array import Dequantize
    from monai_condflow.utils.distributed import create_loader

    rng = np.random.default_rng(0)
    n = args.loader_batch * args.loader_batches
    records = [{"image": rng.random((args.size, args.size), dtype=np.float32), "label": i % 2} for i in range(n)]
    loaders = {}
    for copy_cache in (False, True):
        dataset = CacheDataset(records, get_array_transforms(n_bits=8), cache_rate=1.0, copy_cache=copy_cache,
                               num_workers=0, progress=False)  # fmt: skip
        loaders[copy_cache] = create_loader(dataset, args.loader_batch, shuffle=True, seed=0, drop_last=True)
    times: dict[bool, list[float]] = {False: [], True: []}
    for rep in range(2 * args.reps + 2):  # the first round of each warms up
        for copy_cache in (False, True) if rep % 2 == 0 else (True, False):
            t0 = time.perf_counter()
            for _ in loaders[copy_cache]:
                pass
            if rep >= 2:
                times[copy_cache].append(1000 * (time.perf_counter() - t0) / args.loader_batches)
    x = torch.from_numpy(rng.random((1, args.size, args.size), dtype=np.float32))
    dequantize = Dequantize(8).set_random_state(0)
    dequantize.randomize(x)
    noise = dequantize._noise
    assert torch.equal(dequantize(x, randomize=False), dequantize_before(x, noise, 8))  # the same values
    paths = {"package": lambda: dequantize(x, randomize=False), "before": lambda: dequantize_before(x, noise, 8)}
    per_image: dict[str, float] = {}
    for name, fn in paths.items():
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(500):
                fn()
            runs.append(1e6 * (time.perf_counter() - t0) / 500)
        per_image[name] = statistics.median(runs)
    return {
        "batch": args.loader_batch,
        "ms_per_batch_copy_cache_false": round(statistics.median(times[False]), 2),
        "ms_per_batch_copy_cache_true": round(statistics.median(times[True]), 2),
        "dequantize_us_package": round(per_image["package"], 1),
        "dequantize_us_before": round(per_image["before"], 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="paper", help="the flow preset whose module structure is used")
    parser.add_argument("--hidden", type=int, default=4, help="coupling width of every level (small: host-bound)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--classifier", default="paper", help="PEPXNet preset computing the condition")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=30, help="iterations per epoch (and bare steps)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--loader-batch", type=int, default=80, help="batch of the loader measurement (0: none)")
    parser.add_argument("--loader-batches", type=int, default=10, help="batches per epoch of the loader measurement")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    state = process_state()
    torch.set_num_threads(args.threads)
    try:
        classifier = PEPXNet.from_preset(args.classifier, spatial_dims=2, in_channels=1, out_channels=2).eval()
        data = make_data(args.batch * args.iters, args.size, 0)
        flow = make_flow(args, 0)
        print(f"flow: {args.preset} structure, hidden {args.hidden}, {args.size} px: {sum(1 for _ in flow.modules())} "
              f"modules, {sum(1 for _ in flow.parameters())} parameter tensors; classifier {args.classifier}: "
              f"{sum(1 for _ in classifier.modules())} modules; batch {args.batch}, {args.iters} iterations per epoch, "
              f"{args.threads} thread(s)")  # fmt: skip
        rows: dict[str, list] = collections.defaultdict(list)
        counted: dict[str, tuple] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name, run in (("ours", run_ours), ("peer", run_peer)):  # counting (slow, not timed)
                counted[name] = run(args, classifier, data, Path(tmp) / "counted", 0, HostCopies())[2:]
            for rep in range(args.reps):
                for name in ("ours", "peer") if rep % 2 == 0 else ("peer", "ours"):
                    run = run_ours if name == "ours" else run_peer
                    rows[name].append(run(args, classifier, data, Path(tmp), rep))
        result: dict[str, Any] = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
        print("| trainer | iteration ms | host ms per iteration (repetitions) | host copies / iteration | of them "
              "device reads |")  # fmt: skip
        print("|---|---|---|---|---|")
        for name in ("ours", "peer"):
            hosts = [1000 * r[1] for r in rows[name]]
            result[name] = {"iteration_ms": round(statistics.median(1000 * r[0] for r in rows[name]), 2),
                            "host_ms": round(statistics.median(hosts), 2), "host_ms_reps": [round(v, 2) for v in hosts],
                            "host_copies_per_iter": counted[name][0],
                            "device_reads_per_iter": counted[name][1]}  # fmt: skip
            r = result[name]
            print(f"| {name} | {r['iteration_ms']:.1f} | {r['host_ms']:.2f} ({', '.join(f'{v:.2f}' for v in hosts)}) | "
                  f"{r['host_copies_per_iter']:.2f} | {r['device_reads_per_iter']:.2f} |")  # fmt: skip
        result["host_ratio_peer_over_ours"] = round(result["peer"]["host_ms"] / result["ours"]["host_ms"], 2)
        print(f"host time per iteration, peer / ours: {result['host_ratio_peer_over_ours']:.2f}")
        if args.loader_batch > 0:
            loader = result["loader"] = bench_loader(args)
            print(f"training loader, batch {loader['batch']}: {loader['ms_per_batch_copy_cache_false']:.2f} ms per "
                  f"batch (copy_cache false) vs {loader['ms_per_batch_copy_cache_true']:.2f} (MONAI's default true); "
                  f"Dequantize of one image {loader['dequantize_us_package']:.1f} us vs "
                  f"{loader['dequantize_us_before']:.1f} us before (the same values)")  # fmt: skip
    finally:
        restore(state)  # the caller's (a test process runs on after main)
    line = json.dumps(result)
    if args.out is not None:
        args.out.write_text(line + "\n")
    print("BENCH_TRAINER_HOST " + line)
    return result


if __name__ == "__main__":
    main()
