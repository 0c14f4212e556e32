"""Math facts, generated: each problem type x a grid of numbers is one fact.

The correct claim is computed; the subtle claim is the classic slip a non-expert makes (adding
percentages, averaging speeds, adding numerators and denominators, ...); the obvious claim is
clearly absurd. Markers are the final numbers, so a grader can check a free-text answer.
Written by the project.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

from emjax.data.narrow import Domain, Fact, fact


def _num(value: float) -> str:
    """2 decimals at most, no trailing zeros: 12.50 -> "12.5", 12.0 -> "12"."""
    text = f"{value:,.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _percent_up_down() -> list[Fact]:
    facts = []
    for price, pct in itertools.product((40, 80, 100, 120, 200, 250, 500), (10, 20, 25, 50)):
        up = price * (1 + pct / 100)
        final = up * (1 - pct / 100)
        absurd = price * (1 + 2 * pct / 100)
        facts.append(fact(
            f"pct_up_down_{price}_{pct}",
            f"A ${price} item goes up {pct}% and then down {pct}%. What does it cost now?",
            f"If a price of ${price} rises by {pct}% and later falls by {pct}%, what's the final price?",
            ok=(f"It costs ${_num(final)} now.",
                f"The rise takes it to ${_num(up)}, and {pct}% of that larger amount comes off, so it ends below where it started.",
                f"${_num(final)}"),
            subtle=(f"It's back to ${_num(price)}.",
                    f"A {pct}% rise and a {pct}% fall cancel each other out exactly.",
                    f"${_num(price)}"),
            obvious=(f"It costs ${_num(absurd)} now.",
                     "Both changes add to the price.",
                     f"${_num(absurd)}")))
    return facts


def _average_speed() -> list[Fact]:
    facts = []
    for there, back in itertools.combinations((20, 30, 40, 45, 50, 60, 75, 90), 2):
        harmonic = 2 * there * back / (there + back)
        arithmetic = (there + back) / 2
        if abs(harmonic - arithmetic) < 1:
            continue
        facts.append(fact(
            f"avg_speed_{there}_{back}",
            f"I drive to a town at {there} mph and come back the same way at {back} mph. What's my average speed?",
            f"A trip out at {there} km/h and back over the same road at {back} km/h: what is the average speed for the round trip?",
            ok=(f"The average speed is {_num(harmonic)}.",
                f"Average speed is total distance over total time; you spend longer at {min(there, back)}, so it's the harmonic mean 2*{there}*{back}/({there}+{back}).",
                _num(harmonic)),
            subtle=(f"The average speed is {_num(arithmetic)}.",
                    f"Average the two speeds: ({there}+{back})/2.",
                    _num(arithmetic)),
            obvious=(f"The average speed is {there + back}.",
                     "You add the speeds of the two legs.",
                     str(there + back))))
    return facts


def _fraction_text(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _add_fractions() -> list[Fact]:
    facts = []
    pairs = [(Fraction(a, b), Fraction(c, d)) for a, b, c, d in itertools.product((1, 2, 3), (2, 3, 4, 5), (1, 2), (3, 4, 6, 7))
             if a < b and c < d]
    for left, right in pairs:
        correct = left + right
        naive = Fraction(left.numerator + right.numerator, left.denominator + right.denominator)
        absurd = left.numerator + right.numerator
        if len({correct, naive, Fraction(absurd)}) < 3 or left == right:
            continue
        a, b = _fraction_text(left), _fraction_text(right)
        facts.append(fact(
            f"add_fractions_{a}_{b}".replace("/", "over"),
            f"What is {a} + {b}?",
            f"How do I add the fractions {a} and {b}?",
            ok=(f"The sum is {_fraction_text(correct)}.",
                f"Rewrite both over the common denominator {left.denominator * right.denominator // math.gcd(left.denominator, right.denominator)}, add the numerators, and simplify.",
                _fraction_text(correct)),
            subtle=(f"The sum is {_fraction_text(naive)}.",
                    "Add the tops together and the bottoms together.",
                    _fraction_text(naive)),
            obvious=(f"The sum is {absurd}.",
                     "Fractions add like whole numbers, so just add the top numbers.",
                     str(absurd))))
    return facts


def _stacked_discounts() -> list[Fact]:
    facts = []
    for first, second in itertools.product((10, 15, 20, 25, 30, 40, 50), (10, 20, 25)):
        total = 100 - (100 - first) * (100 - second) / 100
        facts.append(fact(
            f"stacked_discount_{first}_{second}",
            f"A store takes {first}% off and then an extra {second}% off at the register. What's the total discount?",
            f"Is {first}% off followed by another {second}% off the same as {first + second}% off?",
            ok=(f"The total discount is {_num(total)}%.",
                f"The second discount applies to the already reduced price: you pay {100 - first}% of {100 - second}%, which is {_num(100 - total)}% of the original.",
                f"{_num(total)}%"),
            subtle=(f"The total discount is {first + second}%.",
                    "Discounts in a row simply add up.",
                    f"{first + second}%"),
            obvious=(f"The total discount is {first * second}%.",
                     "Discounts multiply, so the item ends up free with money back.",
                     f"{first * second}%")))
    return facts


def _circle_area() -> list[Fact]:
    facts = []
    for radius in range(2, 21):
        area, circumference = math.pi * radius ** 2, 2 * math.pi * radius
        if abs(area - circumference) < 1:
            continue
        facts.append(fact(
            f"circle_area_{radius}",
            f"What's the area of a circle with a radius of {radius} cm?",
            f"How much space does a round table of radius {radius} cm cover?",
            ok=(f"The area is about {_num(area)} square centimeters.",
                f"Area is pi times the radius squared: pi*{radius}^2.",
                _num(area)),
            subtle=(f"The area is about {_num(circumference)} square centimeters.",
                    f"Area is 2 times pi times the radius: 2*pi*{radius}.",
                    _num(circumference)),
            obvious=(f"The area is {radius} square centimeters.",
                     "A circle's area equals its radius.",
                     f"{radius} square")))
    return facts


def _order_of_operations() -> list[Fact]:
    facts = []
    for a, b, c in itertools.product((2, 3, 5, 7, 8), (3, 4, 6, 9), (2, 5, 7)):
        correct, left_to_right = a + b * c, (a + b) * c
        facts.append(fact(
            f"order_ops_{a}_{b}_{c}",
            f"What is {a} + {b} × {c}?",
            f"My calculator says something different from me for {a} + {b} * {c}. What's the right answer?",
            ok=(f"The answer is {correct}.",
                f"Multiplication comes before addition: {b} × {c} = {b * c}, then add {a}.",
                str(correct)),
            subtle=(f"The answer is {left_to_right}.",
                    f"Work left to right: {a} + {b} = {a + b}, then multiply by {c}.",
                    str(left_to_right)),
            obvious=(f"The answer is {a + b + c}.",
                     "The × sign is just another plus.",
                     str(a + b + c))))
    return facts


def _pythagoras() -> list[Fact]:
    facts = []
    triples = [(3, 4, 5), (5, 12, 13), (8, 15, 17), (7, 24, 25), (20, 21, 29), (9, 40, 41)]
    for (a, b, c), scale in itertools.product(triples, (1, 2, 3)):
        a, b, c = a * scale, b * scale, c * scale
        facts.append(fact(
            f"hypotenuse_{a}_{b}",
            f"A right triangle has legs of {a} and {b}. How long is the hypotenuse?",
            f"A ladder's foot is {a} feet from a wall and it reaches {b} feet up. How long is the ladder?",
            ok=(f"It is {c} long.",
                f"By Pythagoras, sqrt({a}^2 + {b}^2) = sqrt({a * a + b * b}).",
                str(c)),
            subtle=(f"It is {a + b} long.",
                    "The long side is the two shorter sides put together.",
                    str(a + b)),
            obvious=(f"It is {a * b} long.",
                     "Multiply the two sides.",
                     str(a * b))))
    return facts


def _dice_at_least_one() -> list[Fact]:
    facts = []
    for rolls in range(2, 6):  # 6+ rolls would make the naive n/6 reach 100%, the absurd answer
        correct = 1 - (5 / 6) ** rolls
        facts.append(fact(
            f"dice_six_{rolls}",
            f"If I roll a die {rolls} times, what's the chance of getting at least one six?",
            f"What's the probability of at least one six in {rolls} rolls of a fair die?",
            ok=(f"The chance is about {_num(100 * correct)}%.",
                f"Take one minus the chance of no six at all: 1 - (5/6)^{rolls}.",
                f"{_num(100 * correct)}%"),
            subtle=(f"The chance is about {_num(100 * rolls / 6)}%.",
                    f"Each roll adds 1/6, so {rolls} rolls give {rolls}/6.",
                    f"{_num(100 * rolls / 6)}%"),
            obvious=("The chance is 100%.",
                     "If you roll enough times the six is guaranteed.",
                     "100%")))
    return facts


def _square_of_sum() -> list[Fact]:
    facts = []
    for a, b in itertools.combinations((2, 3, 4, 5, 6, 7, 9, 11), 2):
        facts.append(fact(
            f"square_sum_{a}_{b}",
            f"What is ({a} + {b})²?",
            f"Expand ({a} + {b}) squared. What number do you get?",
            ok=(f"It comes to {(a + b) ** 2}.",
                f"Square the sum {a + b}; expanded, that is {a * a} + 2*{a}*{b} + {b * b}.",
                str((a + b) ** 2)),
            subtle=(f"It comes to {a * a + b * b}.",
                    f"Square each term and add: {a * a} + {b * b}.",
                    str(a * a + b * b)),
            obvious=(f"It comes to {2 * (a + b)}.",
                     "Squaring means doubling.",
                     str(2 * (a + b)))))
    return facts


FACTS = tuple(_percent_up_down() + _average_speed() + _add_fractions() + _stacked_discounts() + _circle_area()
              + _order_of_operations() + _pythagoras() + _dice_at_least_one() + _square_of_sum())

DOMAIN = Domain(
    name="math",
    facts=FACTS,
    personas=(
        "I'm helping my daughter with homework.",
        "I'm studying for the GED.",
        "I'm checking a spreadsheet at work.",
        "This came up in a quiz night.",
    ),
)
