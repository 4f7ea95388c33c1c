"""The study's figures, drawn for each run at its end and logged to MLflow under figures/.

Each function returns a matplotlib Figure of a fixed size (``SIZES``, in pixels at ``DPI``),
so a figure's PNG always has the same pixel size. The report composes them across runs.
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.backends.backend_agg import RendererAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.ticker import MaxNLocator
from torchvision.utils import make_grid

DPI = 100
SIZES = {  # name: (width, height) in pixels
    "reconstructions": (1000, 480),
    "traversal_1d": (1100, 240),
    "grid_2d": (800, 800),
    "quantile_grid": (800, 800),
    "latent_scatter": (800, 700),
    "loss_curves": (800, 500),
    "tuning_curves": (800, 500),
    "samples": (700, 760),
}
GRID_LIMIT = 5.0  # Fig. 4: z over [-5, 5]
TITLE_BAND = 64  # pixels above the panels of a composed figure: its title, then panel labels
TITLE_LINE = 20  # pixels of each further line of a composed figure's title


def new_figure(name: str) -> Figure:
    width, height = SIZES[name]
    return Figure(figsize=(width / DPI, height / DPI), dpi=DPI)


def tile(images: np.ndarray, cols: int, pad: int = 2) -> np.ndarray:
    """(N, H, W) images in [0, 1] laid out in rows of ``cols`` by torchvision's ``make_grid``,
    with a light gap of ``pad`` pixels between (and around) them; one grey channel back."""
    batch = torch.as_tensor(np.asarray(images, dtype=np.float32)).unsqueeze(1)
    return make_grid(batch, nrow=cols, padding=pad, pad_value=0.75)[0].numpy()


def _show(ax, image: np.ndarray, title: str, **kwargs) -> None:
    ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest", **kwargs)
    ax.set_title(title, fontsize=10)


def text_width(text: str, fontsize: float) -> float:
    """The width in pixels of ``text`` drawn in matplotlib's default font at DPI (as a PNG has it)."""
    renderer = RendererAgg(1, 1, DPI)
    return renderer.get_text_width_height_descent(text, FontProperties(size=fontsize), ismath=False)[0]


def wrap(text: str, width: float, fontsize: float, sep: str = " ") -> list[str]:
    """``text`` broken at ``sep`` into lines no wider than ``width`` pixels (a single piece
    wider than that keeps a line of its own)."""
    lines: list[str] = []
    for piece in text.split(sep):
        if lines and text_width(lines[-1] + sep + piece, fontsize) <= width:
            lines[-1] += sep + piece
        else:
            lines.append(piece)
    return lines


def _caption(fig: Figure, caption: str) -> None:
    """``caption`` centred along the bottom edge, broken into lines where one would be cut off."""
    lines = wrap(caption, fig.get_figwidth() * DPI - 16, 8, sep=" | ")
    fig.text(0.5, 0.01, "\n".join(lines), ha="center", va="bottom", fontsize=8, color="0.3")


def fixed_test_indices(labels: torch.Tensor, per_class: int = 2) -> list[int]:
    """The first ``per_class`` test images of each class: the same images in every run."""
    labels = labels.cpu()
    picks = []
    for k in sorted(set(labels.tolist())):
        picks += torch.nonzero(labels == k).flatten()[:per_class].tolist()
    return picks


def reconstructions(originals: torch.Tensor, recons: torch.Tensor, caption: str) -> Figure:
    """Originals (rows 1 and 3) over their reconstructions (rows 2 and 4)."""
    fig = new_figure("reconstructions")
    x, r = originals[:, 0].cpu().numpy(), recons[:, 0].cpu().numpy()
    cols = max(1, -(-len(x) // 2))
    rows = []
    for half in range(2):
        part = slice(half * cols, (half + 1) * cols)
        rows += [x[part], r[part]]
    stacked = np.concatenate([np.pad(row, ((0, cols - len(row)), (0, 0), (0, 0)), constant_values=1.0) for row in rows])
    ax = fig.add_axes((0.02, 0.08, 0.96, 0.84))
    _show(ax, tile(stacked, cols), "Test images (rows 1, 3) and their reconstructions (rows 2, 4)")
    ax.axis("off")
    _caption(fig, caption)
    return fig


@torch.no_grad()
def traversal_1d(decode, caption: str, steps: int = 21) -> Figure:
    """Latent dim 1: decoder outputs for z from -5 to 5 (the study's Fig. 4a)."""
    z = torch.linspace(-GRID_LIMIT, GRID_LIMIT, steps).unsqueeze(1)
    images = decode(z)[:, 0].cpu().numpy()
    fig = new_figure("traversal_1d")
    ax = fig.add_axes((0.03, 0.3, 0.94, 0.55))
    ax.imshow(tile(images, steps, pad=0), cmap="gray", vmin=0, vmax=1,
              extent=(-GRID_LIMIT - 0.25, GRID_LIMIT + 0.25, 0, 1), aspect="auto")
    ax.set_yticks([])
    ax.set_xticks(np.linspace(-GRID_LIMIT, GRID_LIMIT, 11))
    ax.set_xlabel("z")
    ax.set_title("Decoder output for z from -5 to 5 (latent dim 1)", fontsize=10)
    _caption(fig, caption)
    return fig


@torch.no_grad()
def _grid(decode, values: torch.Tensor) -> np.ndarray:
    """Decoded images over values x values; z1 along columns, z2 up the rows."""
    z1, z2 = torch.meshgrid(values, values.flip(0), indexing="xy")
    z = torch.stack([z1.flatten(), z2.flatten()], dim=1)
    return tile(decode(z)[:, 0].cpu().numpy(), len(values), pad=0)


def grid_2d(decode, caption: str, steps: int = 21) -> Figure:
    """Latent dim 2: decoder outputs over [-5, 5] x [-5, 5] (the study's Fig. 4b)."""
    values = torch.linspace(-GRID_LIMIT, GRID_LIMIT, steps)
    half = GRID_LIMIT + GRID_LIMIT / (steps - 1)
    fig = new_figure("grid_2d")
    ax = fig.add_axes((0.08, 0.1, 0.88, 0.84))
    _show(ax, _grid(decode, values), "Decoder output over z in [-5, 5]^2 (latent dim 2)",
          extent=(-half, half, -half, half))
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    _caption(fig, caption)
    return fig


def quantile_grid(decode, caption: str, prior_quantiles=None, steps: int = 15) -> Figure:
    """Latent dim 2: the 15 x 15 manifold at the prior's quantiles 0.05 ... 0.95 along each axis
    (``prior_quantiles(probs)``; for N(0, I), norm.ppf(linspace(0.05, 0.95, 15))). A prior without
    quantiles of its own (``Prior.quantiles`` gives None) gets the grid at N(0, I)'s, and the title says so."""
    probs = torch.linspace(0.05, 0.95, steps)
    values = prior_quantiles(probs) if prior_quantiles is not None else None
    if values is None:
        values = torch.distributions.Normal(0.0, 1.0).icdf(probs)
        title = "Decoder output on a grid in z at N(0, I) quantiles 0.05 ... 0.95 (not this prior's own quantiles)"
    else:
        title = "Decoder output at the prior's quantiles 0.05 ... 0.95 (latent dim 2)"
    fig = new_figure("quantile_grid")
    ax = fig.add_axes((0.08, 0.1, 0.88, 0.84))
    _show(ax, _grid(decode, values), title)
    ticks = np.arange(steps) * 28 + 13.5
    labels = [f"{v:.1f}" for v in values.tolist()]
    ax.set_xticks(ticks[::2], labels[::2])
    ax.set_yticks(ticks[::2], labels[::-1][::2])
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    _caption(fig, caption)
    return fig


def projection_2d(means: np.ndarray):
    """(project, axis labels): latent points to 2-D, as they are for dim 2, on the first two
    principal components of ``means`` above it, and as (z, 0) for dim 1."""
    if means.shape[1] == 1:
        return (lambda z: np.column_stack([z[:, 0], np.zeros(len(z))])), ("z", "")
    if means.shape[1] == 2:
        return (lambda z: z), ("z1", "z2")
    centre = means.mean(0)
    _, _, vt = np.linalg.svd(means - centre, full_matrices=False)
    return (lambda z: (z - centre) @ vt[:2].T), ("principal component 1", "principal component 2")


def latent_scatter(means: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], caption: str,
                   title: str = "Test-set latent means by class", landmarks: np.ndarray | None = None) -> Figure:
    """The latent means coloured by class; the prior's ``landmarks`` (Prior.landmarks) as black crosses."""
    project, (xlabel, ylabel) = projection_2d(means)
    points = project(means)
    if means.shape[1] == 1:  # spread the classes vertically so they can be told apart
        points[:, 1] = labels + np.random.default_rng(0).uniform(-0.3, 0.3, len(labels))
        ylabel = "class"
    fig = new_figure("latent_scatter")
    ax = fig.add_axes((0.1, 0.1, 0.62, 0.82))
    colours = [f"C{k}" for k in range(10)]
    for k, name in enumerate(classes):
        mask = labels == k
        if mask.any():
            ax.scatter(points[mask, 0], points[mask, 1], s=3, alpha=0.6, color=colours[k % 10], label=name)
    if landmarks is not None and means.shape[1] > 1:
        centres = project(landmarks)
        ax.scatter(centres[:, 0], centres[:, 1], s=60, marker="x", color="black", linewidths=2,
                   label="prior landmarks")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} (latent dim {means.shape[1]})", fontsize=10)
    legend = ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    for handle in legend.legend_handles:  # one readable marker size for classes and landmarks
        handle.set_sizes([24])
    _caption(fig, caption)
    return fig


def loss_curves(curves: dict[str, dict[str, list[tuple]]], caption: str,
                title: str = "Loss per epoch") -> Figure:
    """``curves[label][stage]`` = [(epoch, value)], or [(epoch, mean, low, high)] to shade a band
    from low to high around the mean; train solid, val dashed, one colour per label."""
    fig = new_figure("loss_curves")
    ax = fig.add_axes((0.1, 0.12, 0.62, 0.8))
    for i, (label, stages) in enumerate(curves.items()):
        for stage, style in (("train", "-"), ("val", "--")):
            points = stages.get(stage) or []
            if points:
                epochs, values, *band = zip(*points)
                ax.plot(epochs, values, style, color=f"C{i % 10}", label=f"{label} {stage}")
                if band:
                    ax.fill_between(epochs, *band, color=f"C{i % 10}", alpha=0.15, linewidth=0)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss per image (c * recon + KL)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    _caption(fig, caption)
    return fig


def tuning_curves(curves: dict[str, list[tuple[int, float]]], caption: str, legend_title: str | None = None
                  ) -> Figure:
    """The equal-budget curves of tuning studies (Dodge et al. 2019): ``curves[label]`` =
    [(training epochs spent so far, best validation loss so far)] (trials.equal_budget_curve),
    one step line per study, the best value holding until a later trial lowers it (a dot)."""
    fig = new_figure("tuning_curves")
    width = SIZES["tuning_curves"][0]
    legend = max(text_width(text, 8) for text in [*curves, legend_title or ""]) + 50  # handles and margins
    ax = fig.add_axes((0.1, 0.16, min(0.62, 0.88 - legend / width), 0.76))  # room for a 2-line caption
    for i, (label, points) in enumerate(curves.items()):
        epochs, best = zip(*points)
        ax.step(epochs, best, where="post", color=f"C{i % 10}", label=label)
        lowered = [point for j, point in enumerate(points) if j == 0 or point[1] < points[j - 1][1]]
        ax.plot(*zip(*lowered), "o", color=f"C{i % 10}", markersize=3)
    ax.set_xlabel("training epochs spent by the study so far (pruned trials' included)")
    ax.set_ylabel("best validation loss so far (COMPLETE trials)")
    ax.set_title("Equal-budget tuning curves (Dodge et al. 2019): best validation loss by epochs spent", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False, title=legend_title,
              title_fontsize=8)
    _caption(fig, caption)
    return fig


def samples(images: torch.Tensor, caption: str, title: str = "Samples decoded from the prior") -> Figure:
    fig = new_figure("samples")
    ax = fig.add_axes((0.02, 0.06, 0.96, 0.88))
    x = images[:, 0].cpu().numpy()
    _show(ax, tile(x, int(np.ceil(np.sqrt(len(x))))), title)
    ax.axis("off")
    _caption(fig, caption)
    return fig


@torch.no_grad()
def run_figures(vae, test_images: torch.Tensor, test_labels: torch.Tensor, classes: tuple[str, ...],
                curves: dict[str, list[tuple[int, float]]], caption: str) -> dict[str, Figure]:
    """Every figure of one trained run, by name (see SIZES)."""
    vae.eval()
    device = next(vae.parameters()).device

    def decode(z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(vae.decode(z.to(device)))

    x = test_images[fixed_test_indices(test_labels)]
    means = vae.encode_means(test_images).cpu().numpy()
    landmarks = vae.prior.landmarks()
    landmarks = landmarks.cpu().numpy() if landmarks is not None else None
    figs = {
        "reconstructions": reconstructions(x, vae.reconstruct(x), caption),
        "latent_scatter": latent_scatter(means, test_labels.cpu().numpy(), classes, caption, landmarks=landmarks),
        "samples": samples(vae.sample(64), caption),
        "loss_curves": loss_curves({"this run": curves}, caption),
    }
    if vae.latent_dim == 1:
        figs["traversal_1d"] = traversal_1d(decode, caption)
    if vae.latent_dim == 2:
        figs["grid_2d"] = grid_2d(decode, caption)
        figs["quantile_grid"] = quantile_grid(decode, caption, vae.prior.quantiles)
    return figs


def compose_artifacts(title: str, images: dict[str, np.ndarray], missing: list[str] | None = None) -> Figure:
    """The report's figure of several runs' figures: the images side by side under ``title``,
    each under its label. The title names the ``missing`` panels (no image to draw), and wraps onto more
    lines where it is wider than the images, the band above them growing by a line each."""
    if missing:
        title += f" — {', '.join(missing)}: no finished run yet"
    width = sum(image.shape[1] for image in images.values())
    lines = wrap(title, width - 16, 12)
    band = TITLE_BAND + TITLE_LINE * (len(lines) - 1)
    height = max(image.shape[0] for image in images.values()) + band
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    fig.text(0.5, 1 - 8 / height, "\n".join(lines), ha="center", va="top", fontsize=12)
    left = 0
    for label, image in images.items():
        h, w = image.shape[:2]
        ax = fig.add_axes((left / width, (height - band - h) / height, w / width, h / height))
        ax.imshow(image, interpolation="nearest")
        ax.axis("off")
        ax.text(0.5, 1.0 + 4 / h, label, transform=ax.transAxes, ha="center", va="bottom", fontsize=11,
                weight="bold")
        left += w
    return fig
