"""What ``genlab train`` and ``genlab sample`` print of a run's evaluation (``samples.json``): where its
picture is and one line per quality number it holds, then the table of its reference and step-count rows."""

from __future__ import annotations

from pathlib import Path

from .evaluation import table

LINES = (  # (key, line): printed in this order for each key the metrics hold, formatted with the metrics
    # an autoencoder's
    ("reconstruction_mse", "held-out reconstruction MSE (pixels in [0, 1]): {reconstruction_mse:.5f} "
                           "(PSNR {reconstruction_psnr:.2f} dB)"),
    ("codebook_usage", "codebook on held-out data: {codebook_usage:.1%} of the codes used, perplexity {perplexity:.1f}"),
    ("kl_per_image", "KL(q(z|x) || N(0, I)) per held-out image: {kl_per_image:.2f} nats"),
    ("scaling_factor", "latent scaling factor: {scaling_factor:.5f}"),
    # vector data's
    ("sliced_wasserstein", "sliced Wasserstein-2 to held-out data: {sliced_wasserstein:.4f} "
                           "(two held-out draws: {sliced_wasserstein_data_vs_data:.4f})"),
    ("wasserstein2", "exact Wasserstein-2 to held-out data ({wasserstein2_points} points): {wasserstein2:.4f} "
                     "(two held-out draws: {wasserstein2_data_vs_data:.4f})"),
    ("heldout_nll_nats", "held-out negative log-likelihood: {heldout_nll_nats:.4f} nats "
                         "({heldout_bits_per_dim:.4f} bits/dim{true_density})"),
    # images'
    ("classifier_accuracy", "digits classifier accuracy on the requested labels: {classifier_accuracy:.1%}"),
    ("frechet_distance", "Frechet distance in the classifier's feature space: {frechet_distance:.3f} "
                         "(training images vs the same held-out digits: {frechet_distance_data_vs_data:.3f})"),
    ("confident_fraction", "classified as some digit with probability > 0.9: {confident_fraction:.1%} of the samples "
                           "(held-out test digits: {confident_fraction_data:.1%})"),
    ("control_iou", "IoU of the samples' controls (made as the data's) with the requested ones: {control_iou:.3f}"),
)


def print_report(out: Path, m: dict) -> None:
    """Print where the samples are and the quality numbers of the run."""
    if "image" in m and "sampler" in m:
        print(f"samples: {out / m['image']}  ({m['sampler']}, {m['sampling_seconds']:.1f} s)")
    elif "image" in m:  # a family that draws no samples: its own picture (an autoencoder's reconstructions)
        print(f"picture: {out / m['image']}")
    noisy = {k.removeprefix("classifier_accuracy_t"): v for k, v in m.items() if k.startswith("classifier_accuracy_t")}
    if noisy:  # a noise-conditional classifier's
        print("classifier accuracy on held-out data noised at t / t_max: "
              + ", ".join(f"{t}: {v:.1%}" for t, v in noisy.items()))
    own = m.get("heldout_nll_nats_data")  # the data's true density, where the data set has one
    values = {**m, "true_density": "" if own is None else f"; the data's true density: {own:.4f} nats"}
    for key, line in LINES:
        if key in m:
            print(line.format(**values))
    if m.get("rows"):
        print("\n".join(["next to the references and in train.eval_steps:", *table(m["rows"])]))
