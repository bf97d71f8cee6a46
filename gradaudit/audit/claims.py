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


def verdict(result: dict) -> str:
    """The one-sentence answer, worded so that a weak signal reads as weak."""
    test, exposure = result["collection_test"], result["exposure"]
    chosen = result["cross_validated"][result["method"]]
    cv, (low, high) = chosen["auroc"], chosen["auroc_ci"]
    n_ref = result["reference"]["members"] + result["reference"]["nonmembers"]
    signals = {**{f"gradient method '{k}'": v["auroc"] for k, v in result["cross_validated"].items()},
               **{f"baseline '{k}'": v for k, v in result["cross_validated_baselines"].items()}}
    best = max(signals, key=signals.get)
    share = f"{100 * exposure['estimate']:.0f}% (95% CI {100 * exposure['ci'][0]:.0f}–{100 * exposure['ci'][1]:.0f}%)"
    if not signal_established(result):
        lead = ("No conclusion about this collection: the chosen method does not separate known members from "
                "non-members better than chance on this model, so neither the collection test "
                f"(p = {test['p_value']:.2g}) nor the estimated share of training pairs ({share}) can be trusted")
    elif test["p_value"] < 0.05:
        lead = (f"Evidence that this collection contains training pairs (one-sided test p = {test['p_value']:.2g}); "
                f"estimated share of training pairs {share}")
    else:
        lead = (f"No evidence that this collection contains training pairs (one-sided test p = "
                f"{test['p_value']:.2g}); estimated share of training pairs {share}")
    return (f"{lead}. "
            f"The signal on this model is {strength(low)}: the chosen method separates known members from "
            f"non-members with AUROC {cv:.2f} (95% CI {low:.2f}–{high:.2f}, {n_ref} reference pairs; 0.5 = chance); "
            f"the strongest signal was the {best} ({signals[best]:.2f}).")
