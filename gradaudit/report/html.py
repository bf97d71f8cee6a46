"""The audit's HTML report: one self-contained page (figures inline, also saved as PNG files) that says
on its first screen what was audited, the verdict, how sure it is, and which signal carried it."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable

import numpy as np

from gradaudit.audit import metrics
from gradaudit.audit.claims import verdict
from gradaudit.audit.collection import CollectionAudit
from gradaudit.audit.per_pair import Evaluation, Fit, ScoredSet


def _rate(value) -> str:
    return "n/a (too few non-members)" if value is None else f"{value:.3f}"


def _figure(draw, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw(plt)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _collection_section(result: dict, audit: CollectionAudit, figure_path: Callable[[str], str]) -> str:
    """The collection's answer: the test, the blind guard, what carried the signal, the held-out scores."""
    c, t, g = result["collection"], audit.test, audit.guard

    def held_out(plt):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        values = np.concatenate(list(t.scores.values()))
        bins = np.histogram_bin_edges(values, bins=30)
        for name, label in (("nonmembers", "known non-members (held out)"), ("collection", "the collection (held out)"),
                            ("members", "known members (held out)")):
            if name in t.scores:
                ax.hist(t.scores[name], bins=bins, density=True, alpha=0.45 if name != "collection" else 1.0,
                        histtype="stepfilled" if name != "collection" else "step", lw=2, label=label)
        ax.set_xlabel("aggregator score (fitted on other pairs); higher = more like a training pair")
        ax.legend(fontsize=8)
        return fig

    image = _figure(held_out, figure_path("collection"))
    rows = "".join(
        f"<tr><td>{html.escape(f['feature'])}</td><td>{f['weight']:+.3f}</td><td>{f['held_out_auroc']:.3f}</td></tr>"
        if "weight" in f else f"<tr><td>{html.escape(f['feature'])}</td><td>—</td><td>{f['held_out_auroc']:.3f}</td></tr>"
        for f in t.features)

    def line(name, x):
        return (f"<tr><td>{name}</td><td>{x.p_value:.3g}</td><td>{x.auroc:.3f} [{x.auroc_ci[0]:.3f}, "
                f"{x.auroc_ci[1]:.3f}]</td><td>{x.n_test['collection']} / {x.n_test['nonmembers']}</td></tr>")

    n_left = c["tested_pairs_left_out_as_reference_pairs"]
    left_out = f", {n_left} of them left out as reference pairs" if n_left else ""
    if t.design == "known members":
        how = (f"The per-pair method was cross-validated and chosen on {t.n_fit['members']} known members against "
               f"{t.n_fit['nonmembers']} of the known non-members; it scored the collection and the other "
               f"{t.n_test['nonmembers']} known non-members, which no fit saw.")
    else:
        how = (f"No known members: an aggregator over every per-pair feature (the logit baselines, per-layer gradient "
               f"norms and cosines with R) was fitted on {t.n_fit['collection']} pairs of the collection against "
               f"{t.n_fit['nonmembers']} known non-members, and scored the other halves, which it never saw.")
    return f"""<h2>Was this collection used?</h2>
<p>The collection (set “{html.escape(c['set'])}”, {c['pairs']} pairs{left_out}) against
{c['nonmembers']} known non-members, which you vouch are drawn like the collection's unused pairs: the
comparison means something only if they are. {how} Then a one-sided Mann–Whitney test asks whether the
collection's held-out scores exceed the held-out non-members'. The blind guard runs the same test on
{html.escape(c['blind_features'])}, which never touch the model: if it separates them, they differ by
distribution and no conclusion about training is drawn.</p>
<table><tr><th>test</th><th>p-value</th><th>held-out AUROC [95% CI]</th><th>tested: collection / non-members</th></tr>
{line("the model's features", t)}{line("blind guard (no model)", g)}</table>
<h3>What carried the signal</h3><table><tr><th>score or feature</th><th>weight (standardised)</th>
<th>held-out AUROC, collection against non-members</th></tr>{rows}</table>
<h3>Held-out aggregator scores</h3><img src='data:image/png;base64,{image}'>"""


def render(result: dict, fit: Fit | None, scored: ScoredSet | None, evaluation: Evaluation | None,
           collection: CollectionAudit | None, figure_path: Callable[[str], str]) -> str:
    """The report page of a set: the collection's answer first (``collection``), then the per-pair audit
    where there is a fit; ``result`` is what metrics.json holds. Each figure is also saved as a PNG at
    ``figure_path(name)``. Returns the page."""
    top = _collection_section(result, collection, figure_path) if collection is not None else ""
    body = _per_pair_section(result, fit, scored, evaluation, figure_path) if fit is not None else \
        "<h2>Per pair</h2><p>No known members were given, so no per-pair method was fitted.</p>"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>GradAudit report</title><style>
body{{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}}
.verdict{{font-size:1.25em;background:#f3f6fa;border-left:6px solid #3b6ea5;padding:1em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px}}tr.b td{{color:#666}}img{{max-width:100%}}
</style></head><body><h1>GradAudit report</h1>
<p class="verdict">{html.escape(verdict(result))}</p>
<p>Model: the {html.escape(str(result['model']['model_type']))} model {html.escape(str(result['model']['model']))}
{'with adapter ' + html.escape(str(result['model']['adapter'])) + ' ' if result['model']['adapter'] else ''}({result['selection']}
weight matrices), each pair in the prompt format <code>{html.escape(repr(result['model'].get('prompt_format')))}</code>.
Run folder: {html.escape(str(result['run']))}.</p>
{top}{body}</body></html>"""


def _per_pair_section(result: dict, fit: Fit, scored: ScoredSet, evaluation: Evaluation | None,
                      figure_path: Callable[[str], str]) -> str:
    """The per-pair audit: the cross-validated comparison, the calibrated scores, the paper's mask, and
    the evaluation on the set's labels where it has them."""
    figures = []
    oof, n_m = fit.chosen.scores, fit.n_members
    probe_scores = scored.scores["gradaudit"]

    def comparison(plt):
        names = list(result["cross_validated"]) + list(result["cross_validated_baselines"])
        values = [result["cross_validated"][k]["auroc"] for k in result["cross_validated"]] + \
                 list(result["cross_validated_baselines"].values())
        fig, ax = plt.subplots(figsize=(7, 0.28 * len(names) + 1))
        colors = ["tab:blue" if k in result["cross_validated"] else "tab:gray" for k in names]
        ax.barh(names, values, color=colors)
        ax.axvline(0.5, color="k", lw=1, ls="--")
        ax.set_xlim(0.0, 1.0)
        ax.set_xlabel("AUROC on the reference pairs (cross-validated; 0.5 = chance)")
        ax.set_title("Which signal separates known members from non-members")
        return fig

    figures.append(("Cross-validated comparison (blue: gradient methods, grey: baselines)",
                    _figure(comparison, figure_path("comparison"))))

    def histograms(plt):
        cal = scored.calibrator
        fig, ax = plt.subplots(figsize=(7, 3.5))
        bins = np.histogram_bin_edges(np.concatenate([oof, probe_scores]), bins=30)
        ax.hist(oof[n_m:], bins=bins, density=True, alpha=0.5, label="reference non-members")
        ax.hist(oof[:n_m], bins=bins, density=True, alpha=0.5, label="reference members")
        ax.hist(probe_scores, bins=bins, density=True, histtype="step", lw=2, color="k", label="audited pairs")
        grid = np.linspace(bins[0], bins[-1], 200)
        for (mean, std), name in ((cal.nonmember_, "non-member component"), (cal.member_, "member component")):
            ax.plot(grid, np.exp(-0.5 * ((grid - mean) / std) ** 2) / (std * np.sqrt(2 * np.pi)), label=name)
        ax.set_xlabel(f"score ({result['method']}); higher = more likely a training pair")
        ax.legend(fontsize=8)
        return fig

    figures.append(("Scores with the fitted mixture", _figure(histograms, figure_path("scores"))))

    def deltas(plt):
        paper = fit.paper
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 5), gridspec_kw={"width_ratios": [1, 1.3]}, layout="constrained")
        a.hist(paper.delta_, bins=40)
        a.set_xlabel("Δ_k = member − non-member mean cosine (paper's variant)")
        a.set_ylabel("slices")
        kept = [(n.replace("model.", "").replace(".weight", ""), k / s) for n, (k, s) in paper.kept_.items()]
        shown = sorted(kept, key=lambda kv: kv[1])[-24:]  # the weight axes with the most slices kept
        b.barh([k for k, _ in shown], [v for _, v in shown])
        b.set_xlabel(f"fraction of slices kept (the {len(shown)} highest of {len(kept)} weight axes)")
        b.tick_params(axis="y", labelsize=6)
        return fig

    figures.append(("The paper's mask: Δ per slice and kept slices per weight",
                    _figure(deltas, figure_path("mask"))))

    if evaluation is not None:
        y = evaluation.y

        def rocs(plt):
            fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
            for name, s in scored.scores.items():
                fpr, tpr = metrics.roc_curve(s[y], s[~y])
                style = dict(lw=2.5) if name == "gradaudit" else dict(lw=1, alpha=0.6)
                a.plot(fpr, tpr, label=name, **style)
                b.loglog(np.maximum(fpr, 1e-4), np.maximum(tpr, 1e-4), **style)
            for ax in (a, b):
                ax.plot([1e-4, 1], [1e-4, 1], "k--", lw=1)
                ax.set_xlabel("false-positive rate")
                ax.set_ylabel("true-positive rate")
            a.legend(fontsize=6, ncol=2)
            b.set_title("log-log")
            return fig

        figures.append(("ROC on the audited pairs (their labels)", _figure(rocs, figure_path("roc"))))

        def reliability(plt):
            p = scored.probability
            edges = np.linspace(0, 1, 11)
            which = np.clip(np.digitize(p, edges) - 1, 0, 9)
            xs = [p[which == i].mean() for i in range(10) if (which == i).any()]
            ys = [y[which == i].mean() for i in range(10) if (which == i).any()]
            fig, ax = plt.subplots(figsize=(4, 4))
            ax.plot([0, 1], [0, 1], "k--", lw=1)
            ax.plot(xs, ys, "o-")
            ax.set_xlabel("predicted P(member)")
            ax.set_ylabel("observed member share")
            return fig

        figures.append(("Reliability of the probabilities", _figure(reliability, figure_path("reliability"))))

    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v['auroc']:.3f} [{v['auroc_ci'][0]:.2f}, {v['auroc_ci'][1]:.2f}]</td></tr>"
                   for k, v in sorted(result["cross_validated"].items(), key=lambda kv: -kv[1]["auroc"]))
    rows += "".join(f"<tr class=b><td>baseline: {html.escape(k)}</td><td>{v:.3f}</td></tr>"
                    for k, v in sorted(result["cross_validated_baselines"].items(), key=lambda kv: -kv[1]))
    evaluation_html = ""
    if "evaluation" in result:
        ev = result["evaluation"]
        lines = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{v['auroc']:.3f} [{v['auroc_ci'][0]:.3f}, {v['auroc_ci'][1]:.3f}]</td>"
            f"<td>{_rate(v['tpr_at_0.01_fpr'])}</td></tr>"
            for k, v in ev.items() if isinstance(v, dict) and "auroc" in v)
        d = ev["gradaudit_minus_best_baseline"]
        evaluation_html = (f"<h2>On the audited pairs' own labels</h2><table><tr><th>score</th><th>AUROC [95% CI]</th>"
                      f"<th>TPR at 1% FPR</th></tr>{lines}</table><p>GradAudit − best baseline ({html.escape(d['baseline'])}): "
                      f"{d['difference']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] (paired bootstrap). True member "
                      f"share {100 * result['true_member_share']:.0f}%, estimated {100 * result['exposure']['estimate']:.0f}%.</p>")
    if "association" in result:
        a = result["association"]
        lines = "".join(f"<tr><td>{html.escape(k)}</td><td>{v['auroc']:.3f} [{v['auroc_ci'][0]:.3f}, {v['auroc_ci'][1]:.3f}]</td></tr>"
                        for k, v in sorted(a["scores"].items(), key=lambda kv: -kv[1]["auroc"]))
        evaluation_html += (f"<h2>Association: correct pairs against shuffled ones</h2><p>{a['pairs']} audited pairs against "
                       "the same images with other audited pairs' texts. A high AUROC says the score ties a text to its "
                       "image; it says nothing about membership, since both sides hold the same images and texts.</p>"
                       f"<table><tr><th>score</th><th>AUROC [95% CI]</th></tr>{lines}</table>")
    images = "".join(f"<h3>{html.escape(t)}</h3><img src='data:image/png;base64,{b}'>" for t, b in figures)
    return f"""<h2>Per pair</h2>
<p>{result['probes']} image–text pairs (set “{html.escape(result['set'])}”) scored with {result['reference']['members']}
known training pairs ({'scored leave-one-out against the R they built' if result['reference']['members_in_r'] else
  'beside the ' + str(result['reference']['r_builders']) + ' whose gradients form the reference R'}) and
{result['reference']['nonmembers']} known non-training pairs as reference. Method:
<b>{html.escape(result['method'])}</b> (chosen by {result['reference']['folds']}-fold cross-validation on the
reference pairs only).</p>
<h3>How well each signal separates known members (cross-validated)</h3><table><tr><th>signal</th><th>AUROC [95% CI]</th></tr>{rows}</table>
{evaluation_html}{images}"""
