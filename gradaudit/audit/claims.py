"""What a verdict may claim (docs/protocol.md, the claim rule), and the one-sentence answer worded so that
a weak signal reads as weak. It reads the JSON that ``metrics.json`` holds (``per_pair.result``)."""

from __future__ import annotations


def strength(ci_low: float) -> str:
    """Judged by the lower end of the interval, since the best of several variants on few reference
    pairs is flattered by chance."""
    if ci_low < 0.55:
        return "not distinguishable from chance"
    if ci_low < 0.65:
        return "weak"
    if ci_low < 0.8:
        return "moderate"
    return "strong"


def signal_established(result: dict) -> bool:
    """Whether the chosen method beats chance on the reference pairs: the lower end of its out-of-fold
    AUROC interval above 0.5. Without it, a collection test or share estimate has nothing to stand on:
    a method fitted to permuted reference labels still "detects" collections whose scores happen to
    lean its way."""
    return result["cross_validated"][result["method"]]["auroc_ci"][0] > 0.5


def collection_verdict(c: dict) -> str:
    """The collection's answer (``metrics.json``'s "collection"): the blind guard first, since a
    collection that differs from the known non-members without the model says nothing about training."""
    t, g = c["test"], c["blind_guard"]
    held_out = (f"{t['n_test']['collection']} pairs of the collection against {t['n_test']['nonmembers']} known "
                "non-members, none used in any fit")
    if g["fired"]:
        return (f"No conclusion about training: this collection differs from the known non-members without the model "
                f"(blind guard p = {g['p_value']:.2g}, AUROC {g['auroc']:.2f} from {c['blind_features']}), so they are "
                "not drawn from one distribution, and whatever the model shows may be that difference; give known "
                "non-members drawn like the collection")
    auc, (low, high) = t["auroc"], t["auroc_ci"]
    per_pair = f"held-out AUROC {auc:.2f} (95% CI {low:.2f}–{high:.2f}; 0.5 = none)"
    if t["p_value"] >= c["alpha"]:
        return (f"No evidence that this collection was used to train the model (p = {t['p_value']:.2g}; {per_pair}; "
                f"{held_out}). This does not show that it was not used: a larger collection, or known members, "
                "may find what this test could not")
    share = t["share"]
    if share["kind"] == "estimate":
        used = (f"estimated share used {100 * share['estimate']:.0f}% (95% CI {100 * share['ci'][0]:.0f}–"
                f"{100 * share['ci'][1]:.0f}%, {share['note']})")
    else:
        used = f"at least {100 * share['ci'][0]:.0f}% of it used (95%, one-sided)"
    weak = " Each pair's signal is weak; it adds up over the collection." if auc < 0.65 else ""
    return (f"Evidence that this collection was used to train the model (p = {t['p_value']:.2g}; {per_pair}; "
            f"{held_out}); {used}.{weak}").rstrip(".")  # verdict() ends the sentence


def per_pair_verdict(result: dict) -> str:
    """The per-pair audit's answer, worded so that a weak signal reads as weak."""
    exposure = result["exposure"]
    chosen = result["cross_validated"][result["method"]]
    cv, (low, high) = chosen["auroc"], chosen["auroc_ci"]
    n_ref = result["reference"]["members"] + result["reference"]["nonmembers"]
    signals = {**{f"gradient method '{k}'": v["auroc"] for k, v in result["cross_validated"].items()},
               **{f"baseline '{k}'": v for k, v in result["cross_validated_baselines"].items()}}
    best = max(signals, key=signals.get)
    share = f"{100 * exposure['estimate']:.0f}% (95% CI {100 * exposure['ci'][0]:.0f}–{100 * exposure['ci'][1]:.0f}%)"
    text = (f"Per pair, the signal on this model is {strength(low)}: the chosen method separates known members from "
            f"non-members with AUROC {cv:.2f} (95% CI {low:.2f}–{high:.2f}, {n_ref} reference pairs; 0.5 = chance); "
            f"the strongest signal was the {best} ({signals[best]:.2f})")
    if signal_established(result) and strength(low) != "not distinguishable from chance":
        return f"{text}; estimated share of training pairs among the audited pairs {share}."
    return f"{text}; no per-pair probability or share is claimed."


def verdict(result: dict) -> str:
    """The answer in a few sentences: the collection first, the per-pair audit below it."""
    parts = []
    if "collection" in result:
        parts.append(collection_verdict(result["collection"]) + ".")
    if "cross_validated" in result:
        parts.append(per_pair_verdict(result))
    return " ".join(parts)
