"""The model card rendered for people (``model_card.md`` of a bundle).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from export.bundle_format import RELEASE_ID_KEY

__all__ = [
    "render_model_card_md",
]


def render_model_card_md(card: Mapping[str, Any], digests: Mapping[str, str]) -> str:
    """Render the model card for people: known sections first, the rest as JSON.

    Args:
        card: The model card (as written to ``model_card.json``).
        digests: Artefact file name -> SHA-256 hex, listed in a table.

    Returns:
        Markdown text.
    """
    release_id = card.get(RELEASE_ID_KEY, "?")
    lines = [f"# Model release {release_id}", ""]
    first = ("task", "intended_use", "contributing_sites", "privacy_statement",
             "membership_inference")
    for key in first:
        if key in card:
            value = card[key]
            text = (_contributors_md(value) if key == "contributing_sites" else
                    _membership_md(value, card.get("privacy_statement"))
                    if key == "membership_inference" else None)
            lines += [f"## {key.replace('_', ' ').capitalize()}", "",
                      text if text is not None else _md_value(value), ""]
    for key in sorted(k for k in card if k not in {RELEASE_ID_KEY, *first}):
        lines += [f"## {key.replace('_', ' ').capitalize()}", "", _md_value(card[key]), ""]
    lines += ["## Files", "", "| file | SHA-256 |", "|---|---|"]
    lines += [f"| `{n}` | `{d}` |" for n, d in sorted(digests.items())]
    lines += [
        "",
        "The signed manifest in `model.sig` is authoritative. Check the bundle before use, "
        "signature, files and revocation together:",
        "",
        "    fedward-verify <bundle> --public-key <release key .pub.pem> "
        "--coordinator <release portal address>",
        "",
        "The standard OpenSSF tool checks the signature and the signed files only (not "
        "revocation, not the release id, not stray empty folders); as a second opinion, "
        "with `.git*` files included:",
        "",
        "    model_signing verify key <bundle> --signature <bundle>/model.sig "
        "--public_key <release key .pub.pem> --no-ignore-git-paths",
        "",
    ]
    return "\n".join(lines)


def _membership_md(value: Any, privacy: Any) -> str | None:
    """The measured-leakage section as a table beside each site's epsilon, or ``None``."""
    if not isinstance(value, Mapping) or not isinstance(value.get("per_site"), Mapping):
        return None
    spent = privacy.get("per_site", {}) if isinstance(privacy, Mapping) else {}
    rows = [str(value.get("method", "")), "",
            "| site | epsilon spent | attack AUC | loss AUC | calibrated AUC | "
            "empirical epsilon >= | rows per side |", "|---|---|---|---|---|---|---|"]
    for site, a in sorted(value["per_site"].items()):
        if not isinstance(a, Mapping):
            continue
        eps = spent.get(site, {}).get("epsilon") if isinstance(spent, Mapping) else None
        rows.append(f"| {site} | {_md_value(eps)} | {_md_value(a.get('auc'))} | "
                    f"{_md_value(a.get('loss_auc'))} | {_md_value(a.get('calibrated_auc'))} | "
                    f"{_md_value(a.get('epsilon_lower_bound'))} | {_md_value(a.get('n'))} |")
    if not value["per_site"]:
        rows.append("| (no site reported an audit) | | | | | | |")
    return "\n".join(rows)


def _contributors_md(value: Any) -> str | None:
    """Which sites trained the model, as a table; ``None`` if ``value`` has another shape."""
    if not isinstance(value, Mapping) or not isinstance(value.get("rounds_per_site"), Mapping):
        return None
    total = value.get("completed_rounds")
    counted = set(value.get("contributing") or [])
    share = value.get("min_round_share")
    share_text = f"{share:.0%}" if isinstance(share, int | float) else str(share)
    rows = [f"| {site} | {n} of {total} | {'yes' if site in counted else 'no'} |"
            for site, n in sorted(value["rounds_per_site"].items())]
    return "\n".join([
        f"A site counts as contributing when it trained in at least {share_text} of the "
        f"completed rounds; at least "
        f"{value.get('min_sites')} had to.", "",
        "| site | rounds trained | contributing |", "|---|---|---|", *rows])


def _md_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return "```json\n" + json.dumps(value, indent=2, sort_keys=True) + "\n```"
