"""Pictures of a run: the training loss curve and each checkpoint's scores."""
from pathlib import Path


def scores_png(result: dict, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    scores, selected = result["checkpoints"], result["selected"]["iter"]
    iters = [s["iter"] for s in scores]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    if result["loss_curve"]:
        x, y = zip(*result["loss_curve"])
        top.plot(x, y, color="tab:gray", label="training loss")
    for ax in (top, bottom):
        ax.axvline(selected, color="tab:green", linestyle="--", label=f"selected: iter {selected}")
        ax.grid(alpha=0.3)
    top.set_ylabel("loss")
    top.legend(loc="upper right")
    top.set_title("Training loss and checkpoint scores")
    bottom.plot(iters, [s["identity"] for s in scores], "o-", color="tab:blue", label="identity (held-out)")
    bottom.axhline(result["identity_target"], color="tab:blue", alpha=0.4, linestyle=":",
                   label="identity target")
    bottom.set_ylim(-0.05, 1.05)
    bottom.set_ylabel("identity score")
    bottom.set_xlabel("iteration")
    retention = bottom.twinx()
    retention.plot(iters, [s["retention_loss"] for s in scores], "s-", color="tab:red",
                   label="retention loss (nats/token)")
    retention.set_ylabel("retention loss (lower is better)")
    lines = bottom.get_legend_handles_labels()[0] + retention.get_legend_handles_labels()[0]
    bottom.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize=8)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.partial.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out
