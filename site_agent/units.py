"""Unit conversions a hospital's mapping may ask for (a small, fixed table).

Each conversion is linear, ``study_value = local_value * scale + offset``; the reverse of
every entry is derived, so the table lists each pair once. Laboratory concentrations
between mass and molar units depend on the substance, so those entries name it (the
mapping's ``substance``): 1 mmol/L of cholesterol is 38.67 mg/dL, of glucose 18.016 mg/dL.
"""

from __future__ import annotations

from typing import Final

__all__ = ["UnitError", "conversion", "convert", "normalise_unit", "same_dimension"]

# Spellings people use -> one name. Keys are compared lower-case, without spaces or degrees.
_ALIASES: Final = {
    "c": "C", "degc": "C", "celsius": "C",
    "f": "F", "degf": "F", "fahrenheit": "F",
    "kg": "kg", "kilogram": "kg", "kilograms": "kg",
    "lb": "lb", "lbs": "lb", "pound": "lb", "pounds": "lb",
    "g": "g", "gram": "g", "grams": "g",
    "cm": "cm", "m": "m", "in": "in", "inch": "in", "inches": "in", "mm": "mm",
    "mg/dl": "mg/dL", "mmol/l": "mmol/L", "umol/l": "umol/L", "µmol/l": "umol/L",
    "mmhg": "mmHg", "kpa": "kPa",
    "years": "years", "year": "years", "y": "years", "months": "months",
    "bpm": "bpm", "/min": "bpm",
}

# (from, to, substance or None) -> (scale, offset).
_TABLE: Final[dict[tuple[str, str, str | None], tuple[float, float]]] = {
    ("lb", "kg", None): (0.45359237, 0.0),
    ("g", "kg", None): (0.001, 0.0),
    ("F", "C", None): (5.0 / 9.0, -32.0 * 5.0 / 9.0),
    ("in", "cm", None): (2.54, 0.0),
    ("m", "cm", None): (100.0, 0.0),
    ("mm", "cm", None): (0.1, 0.0),
    ("mmHg", "kPa", None): (0.133322, 0.0),
    ("months", "years", None): (1.0 / 12.0, 0.0),
    ("mg/dL", "mmol/L", "cholesterol"): (1.0 / 38.67, 0.0),
    ("mg/dL", "mmol/L", "glucose"): (1.0 / 18.016, 0.0),
    ("mg/dL", "mmol/L", "triglycerides"): (1.0 / 88.57, 0.0),
    ("mg/dL", "umol/L", "creatinine"): (88.42, 0.0),
}


class UnitError(ValueError):
    """No conversion between two units (for that substance)."""


def normalise_unit(unit: str) -> str:
    """One spelling per unit (``degF`` and ``°F`` are ``F``); unknown units unchanged."""
    key = unit.strip().replace("°", "deg").replace(" ", "").lower()
    key = {"degc": "degc", "degf": "degf"}.get(key, key)
    return _ALIASES.get(key, _ALIASES.get(key.removeprefix("deg"), unit.strip()))


def conversion(local: str, study: str, substance: str | None = None) -> tuple[float, float]:
    """(scale, offset) turning a value in ``local`` into one in ``study``.

    Raises:
        UnitError: The table has no such conversion; the message lists what it has.
    """
    a, b = normalise_unit(local), normalise_unit(study)
    if a == b:
        return 1.0, 0.0
    sub = substance.strip().lower() if substance else None
    for key in ((a, b, sub), (a, b, None)):
        if key in _TABLE:
            return _TABLE[key]
    for key in ((b, a, sub), (b, a, None)):
        if key in _TABLE:
            scale, offset = _TABLE[key]
            return 1.0 / scale, -offset / scale
    needs = sorted({s for (x, y, s) in _TABLE if {x, y} == {a, b} and s is not None})
    hint = (f"; name the substance ('substance': one of {', '.join(needs)})" if needs
            else "")
    known = sorted({f"{x} <-> {y}" + (f" ({s})" if s else "") for x, y, s in _TABLE})
    raise UnitError(f"no conversion from {local!r} to {study!r}{hint} (known: "
                    f"{'; '.join(known)})")


def convert(value: float, local: str, study: str, substance: str | None = None) -> float:
    """``value`` in ``local`` units, expressed in ``study`` units."""
    scale, offset = conversion(local, study, substance)
    return value * scale + offset


def same_dimension(study: str, substance: str | None = None) -> list[str]:
    """Every other unit the table converts to ``study`` (for spotting a wrong unit)."""
    b = normalise_unit(study)
    sub = substance.strip().lower() if substance else None
    out: list[str] = []
    for x, y, s in _TABLE:
        if s not in (None, sub):
            continue
        if y == b:
            out.append(x)
        elif x == b:
            out.append(y)
    return sorted(set(out))
