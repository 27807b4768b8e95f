"""What ``genlab train`` and ``genlab sample`` print of a run's evaluation (``samples.json``): where its
picture is and one line per quality number it holds, then the table of its reference and step-count rows."""

from __future__ import annotations

from pathlib import Path

from .evaluation import table


RECONSTRUCTION_LINES = (  # an autoencoder's metrics: (key, line)
    ("reconstruction_mse", "held-out reconstruction MSE (pixels in [0, 1]): {reconstruction_mse:.5f} "
                           "(PSNR {reconstruction_psnr:.2f} dB)"),
    ("codebook_usage", "codebook on held-out data: {codebook_usage:.1%} of the codes used, perplexity {perplexity:.1f}"),
    ("kl_per_image", "KL(q(z|x) || N(0, I)) per held-out image: {kl_per_image:.2f} nats"),
    ("scaling_factor", "latent scaling factor: {scaling_factor:.5f}"))


def print_report(out: Path, m: dict) -> None:
    """Print where the samples are and the quality numbers of the run."""
    if "image" in m and "sampler" in m:
        print(f"samples: {out / m['image']}  ({m['sampler']}, {m['sampling_seconds']:.1f} s)")
    elif "image" in m:  # a family that draws no samples: its own picture (an autoencoder's reconstructions)
        print(f"picture: {out / m['image']}")
    for key, line in RECONSTRUCTION_LINES:
        if key in m:
            print(line.format(**m))
    noisy = {k.removeprefix("classifier_accuracy_t"): v for k, v in m.items() if k.startswith("classifier_accuracy_t")}
    if noisy:
        print("classifier accuracy on held-out data noised at t / t_max: "
              + ", ".join(f"{t}: {v:.1%}" for t, v in noisy.items()))
    if "sliced_wasserstein" in m:
        print(f"sliced Wasserstein-2 to held-out data: {m['sliced_wasserstein']:.4f} "
              f"(two held-out draws: {m['sliced_wasserstein_data_vs_data']:.4f})")
    if "wasserstein2" in m:
        print(f"exact Wasserstein-2 to held-out data ({m['wasserstein2_points']} points): {m['wasserstein2']:.4f} "
              f"(two held-out draws: {m['wasserstein2_data_vs_data']:.4f})")
    if "heldout_nll_nats" in m:
        own = m.get("heldout_nll_nats_data")  # the data's true density, where the data set has one
        data = "" if own is None else f"; the data's true density: {own:.4f} nats"
        print(f"held-out negative log-likelihood: {m['heldout_nll_nats']:.4f} nats "
              f"({m['heldout_bits_per_dim']:.4f} bits/dim{data})")
    if "classifier_accuracy" in m:
        print(f"digits classifier accuracy on the requested labels: {m['classifier_accuracy']:.1%}")
    if "frechet_distance" in m:
        print(f"Frechet distance in the classifier's feature space: {m['frechet_distance']:.3f} "
              f"(training images vs the same held-out digits: {m['frechet_distance_data_vs_data']:.3f})")
    if "confident_fraction" in m:
        print(f"classified as some digit with probability > 0.9: {m['confident_fraction']:.1%} of the samples "
              f"(held-out test digits: {m['confident_fraction_data']:.1%})")
    if "control_iou" in m:
        print(f"IoU of the samples' controls (made as the data's) with the requested ones: {m['control_iou']:.3f}")
    if m.get("rows"):
        print("\n".join(["next to the references and in train.eval_steps:", *table(m["rows"])]))
