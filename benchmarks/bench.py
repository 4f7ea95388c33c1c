"""Training speed of the project's path against the fastest plain PyTorch loop of the same math.

    python benchmarks/bench.py [--epochs 10] [--device cpu|cuda] [--tiny] [--cnn-variants] [--sweep]

On pytorch/examples' VAE (MLP 784-400-20 and back, BCE + KL summed, Adam 1e-3, batch 128),
on the same in-memory MNIST, in one process:
  A  the project's path: our LightningModule and DataModule in the Trainer that a run uses,
     with its per-epoch checkpoint and MLflow metrics;
  B  a minimal plain PyTorch loop of identical math over the same in-memory tensor (the floor);
  C  the usual starting point: a Dataset that turns one uint8 image at a time into a float
     tensor the way torchvision's MNIST + ToTensor does (through a PIL image), fed by a
     DataLoader, with B's loop.
Validation is off in all three, so each epoch is the same training work. Printed: seconds per
epoch (median after a warm-up epoch), images per second, A/B and C/A, the test loss of A and B
after the same epochs, peak resident memory, one epoch of mlp3 and cnn at latent dim 2, and
on request the CNN variants (with a profile) and a sweep's throughput in jobs per minute, serial
against parallel jobs (on a GPU: jobs_per_gpu = 2, 4 and 8 jobs sharing it).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from PIL import Image
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader, Dataset

from vae_sweeps import models, options, store
from vae_sweeps.data import IMAGE_SHAPE, load_arrays
from vae_sweeps.module import VAEModule
from vae_sweeps.options import plain
from vae_sweeps.priors import StandardPrior
from vae_sweeps.runs import EpochEnd
from vae_sweeps.train import make_trainer
from vae_sweeps.vae import VAE

PROJECT = Path(__file__).resolve().parents[1]
EXAMPLES = ("model=mlp2", "model.hidden=[400]", "model.latent_dim=20", "loss=bce", "optim.lr=1e-3",
            "data.batch_size=128")


def compose_job(tmp: Path, *overrides: str):
    """The config a run would use, with validation off so that only training is timed."""
    with initialize_config_dir(config_dir=str(PROJECT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[
            f"paths.output_dir={tmp / 'job'}", f"tracking.uri=sqlite:///{tmp}/mlruns/mlflow.db",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            "+trainer.limit_val_batches=0", "+trainer.num_sanity_val_steps=0", *overrides])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class TimedEpochEnd(EpochEnd):
    """A run's own epoch end (checkpoint, then MLflow metrics), timed from the epoch's start
    to after that work; then, off the clock, ``after`` runs (B's epoch: A and B are timed in
    the same minute of a noisy machine). One callback, as in a real run: Lightning calls
    every hook of every callback at every step, so a separate timer would slow A down."""

    def __init__(self, *args, device: torch.device, after=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.device, self.after, self.seconds = device, after, []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        sync(self.device)
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        sync(self.device)
        self.seconds.append(time.perf_counter() - self.start)
        if self.after is not None:
            self.after()


def project_path(tmp: Path, epochs: int, device: torch.device, overrides=EXAMPLES, limit: int | None = None,
                 after=None):
    """A: (seconds per epoch, trained VAE) through the project's own path; ``after`` runs
    after each epoch, untimed."""
    extra = [f"+trainer.limit_train_batches={limit}"] if limit else []
    cfg = compose_job(tmp, *overrides, f"trainer.max_epochs={epochs}", f"trainer.accelerator={device.type}", *extra)
    client, experiment_id = store.open_store(store.resolve_uri(cfg.tracking.uri), "bench")
    run_id = client.create_run(experiment_id).info.run_id
    datamodule = options.build("data", cfg.data, seed=cfg.seed)
    pl.seed_everything(cfg.seed, verbose=False)
    module = VAEModule(model=plain(cfg.model), loss=plain(cfg.loss), optim=plain(cfg.optim))
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    timer = TimedEpochEnd(output_dir / "last.ckpt", client, run_id, device=device, after=after)
    make_trainer(cfg, [timer], output_dir).fit(module, datamodule=datamodule.lightning())
    client.set_terminated(run_id)
    return timer.seconds, module.vae


def examples_vae(device: torch.device) -> VAE:
    encoder, decoder = models.mlp(20, [400], layers=2, image_shape=IMAGE_SHAPE)
    return VAE(encoder, decoder, StandardPrior(20), c=1.0).to(device)


class PlainLoop:
    """B's and C's loop, one epoch over ``batches()`` per call, with the project's optimiser
    (Adam with torch's fused kernel); ``seconds`` holds each epoch's time."""

    def __init__(self, vae: VAE, batches, device: torch.device):
        self.vae, self.batches, self.device, self.seconds = vae, batches, device, []
        self.optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3, fused=True)

    def __call__(self) -> None:
        sync(self.device)
        start = time.perf_counter()
        for x in self.batches():
            loss = self.vae.loss(x, self.vae(x))["loss"]
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        sync(self.device)
        self.seconds.append(time.perf_counter() - start)


class TorchvisionMNIST(Dataset):
    """What torchvision's ``MNIST`` with ``ToTensor`` does for each item (without importing
    torchvision): the uint8 image to a PIL image, back to a tensor, channels first, scaled to
    float in [0, 1]; and the label as an int, for the DataLoader to collate."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        picture = Image.fromarray(self.images[i].numpy())  # mode "L"
        x = torch.from_numpy(np.array(picture, np.uint8, copy=True)).view(28, 28, 1).permute(2, 0, 1).contiguous()
        return x.to(torch.float32).div(255), int(self.labels[i])


@torch.no_grad()
def test_loss(vae: VAE, images: torch.Tensor) -> float:
    """Per-image BCE + KL on the test set, one z per image, the same noise for every model."""
    vae.eval()
    torch.manual_seed(0)
    total = sum(vae.loss(x, vae(x))["loss"].item() * len(x) for x in images.split(1000))
    vae.train()
    return total / len(images)


def median(seconds: list[float]) -> float:
    return statistics.median(seconds[1:] if len(seconds) > 1 else seconds)  # the first is the warm-up


def peak_rss_of_a_run(tmp: Path, data_root: str, tiny: bool) -> float:
    """GB: the peak resident memory of one real MNIST run (a child process, 1 epoch)."""
    limit = ["+trainer.limit_train_batches=5", "+trainer.limit_val_batches=2", "eval.iw_samples=1",
             "eval.judge_epochs=1"] if tiny else []
    subprocess.run([sys.executable, "-m", "vae_sweeps", "trainer.max_epochs=1", f"data.root={data_root}",
                    f"tracking.uri=sqlite:///{tmp}/rss/mlflow.db", f"hydra.run.dir={tmp}/rss", *limit],
                   check=True, capture_output=True, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6  # KB on Linux


def cnn_variants(device: torch.device, images: torch.Tensor, steps: int) -> None:
    """Where the CNN's time goes, and what each change does to its time per image."""
    from torch.profiler import ProfilerActivity, profile

    def make(batch: int, channels_last: bool = False, compiled: bool = False):
        encoder, decoder = models.cnn(2, [32, 64], [256], image_shape=IMAGE_SHAPE)
        vae = VAE(encoder, decoder, StandardPrior(2)).to(device)
        if channels_last:
            vae = vae.to(memory_format=torch.channels_last)
        step_model = torch.compile(vae) if compiled else vae
        optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3, fused=True)

        def step(x):
            loss = vae.loss(x, step_model(x))["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        fmt = torch.channels_last if channels_last else torch.contiguous_format
        rows = torch.arange(steps * batch, device=images.device) % len(images)  # cycle through the images
        return step, [images[index].contiguous(memory_format=fmt) for index in rows.split(batch)]

    def per_image(step, batches) -> float:
        for x in batches[:3]:  # warm-up (and compilation)
            step(x)
        sync(device)
        start = time.perf_counter()
        for x in batches:
            step(x)
        sync(device)
        return (time.perf_counter() - start) / sum(len(x) for x in batches)

    step, batches = make(128)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for x in batches[:10]:
            step(x)
    print("\nCNN (latent dim 2, batch 128): where a training step's time goes (top ops by self CPU time)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))

    base = per_image(*make(128))
    print(f"CNN training step, ms per image over {steps} steps (relative to batch 128, contiguous, eager):")
    for name, kwargs in [("torch.compile", {"batch": 128, "compiled": True}),  # first: eager runs disturb it
                         ("batch 128 (default)", {"batch": 128}), ("batch 64", {"batch": 64}),
                         ("batch 256", {"batch": 256}), ("channels_last", {"batch": 128, "channels_last": True})]:
        try:
            ms = per_image(*make(**kwargs)) * 1e3
            print(f"  {name:<22} {ms:7.3f} ms/image   x{ms / (base * 1e3):.2f}")
        except Exception as err:  # torch.compile needs a working C++ toolchain
            print(f"  {name:<22} failed: {type(err).__name__}: {str(err)[:120]}")
        torch._dynamo.reset()
    print(f"  oneDNN (mkldnn) enabled: {torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled}")


def timed_command(tmp: Path, overrides: list[str], env: dict[str, str]) -> float:
    """Seconds of one whole ``python -m vae_sweeps`` command (start-up, data, training,
    evaluation, figures, tracking), logging into the store ``tmp/sweeps``."""
    out = tmp / "sweeps" / f"out-{len(list(tmp.glob('sweeps/out-*')))}"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "vae_sweeps", *overrides,
                           f"tracking.uri=sqlite:///{tmp}/sweeps/mlflow.db", f"hydra.run.dir={out}",
                           f"hydra.sweep.dir={out}"], capture_output=True, text=True,
                          env={**env, "MLFLOW_DISABLE_TELEMETRY": "true"})
    if done.returncode:
        raise RuntimeError(f"vae_sweeps {' '.join(overrides)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def one_gpu(device: torch.device) -> dict[str, str]:
    """The environment in which a sweep sees only ``device``'s GPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    index = device.index or 0
    return {**os.environ, "CUDA_VISIBLE_DEVICES": visible.split(",")[index] if visible else str(index)}


def sweep_throughput(tmp: Path, data_root: str, device: torch.device, tiny: bool) -> None:
    """Jobs per minute of the Table 1 grid at 1 epoch per job, whole commands, serial against
    parallel jobs. On the CPU: 2 joblib jobs splitting the cores. On a GPU: jobs_per_gpu = 2,
    4 and 8 jobs sharing one GPU (hydra/launcher=joblib_gpu), over 2 seeds so that 8 jobs can
    run at once. Every sweep logs into one store whose MNIST judge (judge.py) is trained
    first, off the clock, as any store holds it after its first run. The tiny mode also runs
    jobs_per_gpu=2 on the CPU, where it means one job at a time, so that the GPU path cannot
    rot; it runs 2 of the 4 models (mlp2 and cnn), trains 5 batches per job, evaluates log p(x)
    with 1 sample instead of 50 and trains the judge for 1 epoch."""
    gpu = device.type == "cuda"
    seeds = 2 if gpu and not tiny else 1
    models = ["mlp2", "cnn"] if tiny else ["mlp2", "mlp3", "mlp4", "cnn"]
    jobs = len(models) * seeds
    shared = [f"trainer.accelerator={device.type}", f"data.root={data_root}", "force=true", "trainer.max_epochs=1",
              *(["+trainer.limit_train_batches=5", "+trainer.limit_val_batches=2", "eval.iw_samples=1",
                 "eval.judge_epochs=1"] if tiny else [])]
    grid = ["experiment=table1", f"model={','.join(models)}", f"seed={','.join(map(str, range(seeds)))}", *shared]
    if gpu:
        parallel = [(f"jobs_per_gpu={k}", ["hydra/launcher=joblib_gpu", f"jobs_per_gpu={k}"])
                    for k in ((2,) if tiny else (2, 4, 8))]
    else:
        parallel = [("joblib, 2 jobs", ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])]
        if tiny:
            parallel.append(("jobs_per_gpu=2", ["hydra/launcher=joblib_gpu", "jobs_per_gpu=2"]))
    env = one_gpu(device) if gpu else dict(os.environ)
    # off the clock: one short run makes the store and trains its judge
    timed_command(tmp, ["model=mlp2", *shared, "++trainer.limit_train_batches=1", "++eval.iw_samples=1"], env)
    walls = {name: timed_command(tmp, [*grid, *extra], env) for name, extra in [("serial", []), *parallel]}
    where = "one GPU" if gpu else "the CPU"
    print(f"\nSweep throughput on {where}, Table 1 grid ({jobs} jobs: {len(models)} models x {seeds} seed(s), "
          "1 epoch each), whole command:")
    for name, wall in walls.items():
        print(f"  {name:<16} {wall:7.1f} s  {jobs / wall * 60:6.1f} jobs/min   x{walls['serial'] / wall:.2f}")
    if not gpu and tiny:
        print("  (jobs_per_gpu runs one job at a time without a GPU: it only checks the path here)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10, help="epochs of A and B (C runs 3); default 10")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-root", default=os.environ.get("VAE_SWEEPS_DATA_DIR", "data"))
    parser.add_argument("--tiny", action="store_true", help="one short epoch of everything: a smoke test")
    parser.add_argument("--cnn-variants", action="store_true", help="profile the CNN and time its variants")
    parser.add_argument("--sweep", action="store_true",
                        help="time the Table 1 grid serial against joblib (on a GPU: jobs_per_gpu = 2, 4, 8)")
    args = parser.parse_args()
    device = torch.device(args.device)
    epochs, limit = (2, 5) if args.tiny else (args.epochs, None)

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        rss = peak_rss_of_a_run(tmp, args.data_root, args.tiny)
        arrays = load_arrays("mnist", args.data_root, download_missing=True)
        train_u8 = np.array(arrays["train"][0][:55000][: limit * 128 if limit else None])  # a writable copy
        train = torch.from_numpy(train_u8.astype(np.float32) / 255.0).unsqueeze(1).to(device)
        test = torch.from_numpy(arrays["test"][0].astype(np.float32) / 255.0).unsqueeze(1).to(device)
        print(f"Benchmark on {device} ({torch.get_num_threads()} threads, torch {torch.__version__}), "
              f"{len(train)} training images, batch 128, {epochs} epochs")

        def shuffled():
            order = torch.randperm(len(train), device=device)
            return (train[order[i:i + 128]] for i in range(0, len(train), 128))

        labels = np.array(arrays["train"][1][:len(train_u8)])
        loader = DataLoader(TorchvisionMNIST(torch.from_numpy(train_u8), torch.from_numpy(labels)),
                            batch_size=128, shuffle=True, num_workers=0)
        torch.manual_seed(0)
        b = PlainLoop(examples_vae(device), shuffled, device)
        c = PlainLoop(examples_vae(device), lambda: (x.to(device) for x, _ in loader), device)
        c_epochs = min(3, epochs)

        def b_and_c():  # after each epoch of A: one of B, and of C for the first few
            b()
            if len(c.seconds) < c_epochs:
                c()

        a_seconds, a_vae = project_path(tmp, epochs, device, limit=limit, after=b_and_c)  # A, B, C, A, B, ...
        a_s, b_s, c_s = median(a_seconds), median(b.seconds), median(c.seconds)
        print(f"\n{'':<42} {'s/epoch':>8} {'images/s':>9}")
        for name, s in (("A project (Lightning + our DataModule)", a_s), ("B plain PyTorch loop", b_s),
                        ("C torchvision-style Dataset + DataLoader", c_s)):
            print(f"{name:<42} {s:8.3f} {len(train) / s:9.0f}")
        for name, ratios, target in (("A/B", [x / y for x, y in zip(a_seconds, b.seconds)], "<= 1.15"),
                                     ("C/A", [y / x for x, y in zip(a_seconds, c.seconds)], ">= 2")):
            counted = ratios[1:] or ratios
            print(f"{name} = {median(ratios):.3f}   (median of {len(counted)} epoch pairs, {min(counted):.3f} to "
                  f"{max(counted):.3f}; target {target})")
        a_loss, b_loss = test_loss(a_vae, test), test_loss(b.vae, test)
        print(f"test loss after {epochs} epochs: A {a_loss:.2f}, B {b_loss:.2f}, |A - B| = {abs(a_loss - b_loss):.2f}"
              " (target <= 0.5 nats; pytorch/examples reports about 105.5 after 10 epochs)")
        print(f"peak resident memory: one MNIST run {rss:.2f} GB (target < 1.5), this benchmark "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")

        print("\nOne epoch at latent dim 2 through the project's path (median of epochs after the first):")
        for model in ("mlp3", "cnn"):
            seconds, _ = project_path(tmp / model, 1 if args.tiny else 3, device, (f"model={model}",), limit=limit)
            print(f"  {model:<5} {median(seconds):7.2f} s/epoch   {len(train) / median(seconds):7.0f} images/s")

        if args.cnn_variants:
            cnn_variants(device, train, 10 if args.tiny else 60)
        if args.sweep:
            sweep_throughput(tmp, args.data_root, device, args.tiny)


if __name__ == "__main__":
    main()
