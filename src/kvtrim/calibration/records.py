"""Generated record-like text — logs, ledgers, timetables, catalogue entries — full of numbers,
codes, dates and names: what the bundled prose lacks (it holds no digit at all).

A learned surrogate of KVzip (KVzap, Fast KVzip) only predicts well the kinds of tokens its
calibration text shows it; trained on prose alone it has never seen a digit, and documents are
full of them. The text is made from templates with a seeded generator, so it is the same on
every machine and needs no download.
"""

from __future__ import annotations

import random

PLACES = ["Harwick", "Ostley", "Marrow Bay", "Cindervale", "Pellham", "Quarry Lane", "Norland", "Ashby Cross"]
PEOPLE = [
    "A. Moreau",
    "T. Okafor",
    "L. Brandt",
    "S. Iyer",
    "M. Castell",
    "R. Nakamura",
    "J. Delaney",
    "P. Ruiz",
]
GOODS = [
    "crates of pears",
    "reels of copper wire",
    "boxes of tiles",
    "sacks of flour",
    "drums of oil",
    "bales of wool",
]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October"]
UNITS = ["kg", "litres", "metres", "hours", "units"]


def _line(rng: random.Random) -> str:
    place, person, goods = rng.choice(PLACES), rng.choice(PEOPLE), rng.choice(GOODS)
    day, month, year = rng.randint(1, 28), rng.choice(MONTHS), rng.randint(1975, 2031)
    code = f"{rng.choice('ABCDEFGHKLMNPRSTVX')}{rng.choice('ABCDEFGHKLMNPRSTVX')}-{rng.randint(100, 99999)}"
    number, small = rng.randint(1_000, 9_999_999), rng.randint(2, 480)
    hour, minute = rng.randint(0, 23), rng.randint(0, 59)
    templates = [
        f"Shipment {code} left the {place} depot on {day} {month} {year} at {hour:02d}:{minute:02d} with "
        f"{small} {goods}; the receiving clerk, {person}, logged reference {number}.",
        f"Invoice {number} from {place} Supplies totals "
        f"{small * 37 + rng.randint(0, 99)}.{rng.randint(10, 99)} and is due on {month} {day}, {year}.",
        f"Room {rng.randint(1, 9)}{rng.randint(0, 3)}{rng.randint(0, 9)} is booked by {person} from "
        f"{hour:02d}:00 to {(hour + 2) % 24:02d}:00; the access code for the door is "
        f"{rng.randint(1000, 9999)}.",
        f"The {place} station recorded {rng.randint(-15, 38)} degrees, {rng.randint(0, 120)} mm of rain "
        f"and a pressure of {rng.randint(960, 1045)} hPa on {day} {month}.",
        f"Catalogue entry {code}: {goods} from {place}, {small} {rng.choice(UNITS)}, "
        f"shelf {rng.randint(1, 60)}, row {rng.randint(1, 12)}.",
        f"Train {rng.randint(100, 999)} to {place} departs from platform {rng.randint(1, 14)} at "
        f"{hour:02d}:{minute:02d} and arrives {rng.randint(12, 190)} minutes later.",
        f"{person} called extension {rng.randint(2000, 7999)} on {month} {day} about account {number}; "
        f"the balance was {rng.randint(0, 90000)} and the limit {rng.randint(1, 50) * 1000}.",
        f"In {year} the {place} works produced {number} {rng.choice(UNITS)}, up {rng.randint(1, 40)} "
        f"per cent on the year before, with {small} people on its payroll.",
    ]
    return rng.choice(templates)


def record_text(n_lines: int = 900, seed: int = 0) -> str:
    """About 90 KB of record-like lines, grouped in paragraphs of five."""
    rng = random.Random(seed)
    lines = [_line(rng) for _ in range(n_lines)]
    return "\n\n".join(" ".join(lines[i : i + 5]) for i in range(0, len(lines), 5))
