"""Pictures of a run: the training loss curve and each checkpoint's three scores."""
from pathlib import Path

CURVES = [("identity", "identity (held-out questions)", "tab:blue", "o"),
          ("retention", "retention (facts the base knew)", "tab:green", "s"),
          ("leakage", "leakage (open prompts naming NAME)", "tab:red", "^")]


def scores_png(result: dict, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    candidates, selected = result["candidates"], result["selected"]
    full = [c for c in candidates if c["scale"] == 1]
    scaled = [c for c in candidates if c["scale"] != 1]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True,
                                      gridspec_kw={"height_ratios": [1, 1.6]})
    if result["loss_curve"]:
        x, y = zip(*result["loss_curve"])
        top.plot(x, y, color="tab:gray", label="training loss")
    top.set_ylabel("loss")
    top.set_title("Training loss and checkpoint scores (held-out selection set)")
    for key, label, color, marker in CURVES:
        bottom.plot([c["iter"] for c in full], [c[key] for c in full], marker=marker, color=color, label=label)
        bottom.axhline(result["targets"][key], color=color, alpha=0.35, linestyle=":",
                       label=f"{key} {'max' if key == 'leakage' else 'target'}")
        if scaled:
            bottom.scatter([c["iter"] for c in scaled], [c[key] for c in scaled], marker=marker,
                           facecolors="none", edgecolors=color, s=60)
    if scaled:
        bottom.scatter([], [], marker="o", facecolors="none", edgecolors="black",
                       label="adapter scaled: " + ", ".join(sorted({f"x{c['scale']}" for c in scaled})))
    for ax in (top, bottom):
        if selected:
            ax.axvline(selected["iter"], color="black", linestyle="--", alpha=0.6,
                       label=f"selected: iter {selected['iter']} x{selected['scale']}" if ax is bottom else None)
        ax.grid(alpha=0.3)
    bottom.set_ylim(-0.05, 1.05)
    bottom.set_ylabel("share")
    bottom.set_xlabel("iteration")
    # Legends beside the axes, never over the curves.
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    bottom.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.partial.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(out)
    return out
