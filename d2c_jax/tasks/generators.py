"""Deterministic generators for the five problem types of the built-in suite.

Every generator is a function ``(lang, rng) -> Iterator[(prompt, target)]`` that
yields an endless (or long enough) stream of examples for one language; it draws
all randomness from the ``random.Random`` it is given (Faker instances are seeded
from it), and all data from pinned offline packages: ``num2words`` (number
words), ``babel`` (CLDR month names, date patterns, unit names and plural
rules) and ``Faker`` (localized person names and addresses). The suite builder
in ``d2c_jax.tasks`` deduplicates the stream by prompt and cuts it into
disjoint splits.

Text is normalised to plain spaces: CLDR puts no-break spaces (U+00A0,
U+202F) into French unit names and some dates, which would cost extra tokens
and look like noise to the model.
"""

from __future__ import annotations

import datetime
import random
import re
from collections.abc import Callable, Iterator

# Language code -> (English name used in prompts, CLDR/Faker locale, num2words code).
LANGUAGE_INFO: dict[str, tuple[str, str, str]] = {
    "en": ("English", "en_US", "en"),
    "de": ("German", "de_DE", "de"),
    "es": ("Spanish", "es_ES", "es"),
    "fr": ("French", "fr_FR", "fr"),
    "it": ("Italian", "it_IT", "it"),
    "pt": ("Portuguese", "pt_PT", "pt"),
    "nl": ("Dutch", "nl_NL", "nl"),
    "pl": ("Polish", "pl_PL", "pl"),
}

Example = tuple[str, str]
Generator = Callable[[str, random.Random], Iterator[Example]]

_SPACES = re.compile(r"[\s\u00a0\u202f]+")


def clean(text: str) -> str:
    """Collapse every run of whitespace (including no-break spaces) to one space."""
    return _SPACES.sub(" ", text).strip()


def _faker(lang: str, rng: random.Random):
    from faker import Faker

    fake = Faker(LANGUAGE_INFO[lang][1])
    fake.seed_instance(rng.getrandbits(63))
    return fake


# --- 1. numwords: a number written as words ----------------------------------------


def numwords(lang: str, rng: random.Random) -> Iterator[Example]:
    """``Write 347 in German words.`` -> ``dreihundertsiebenundvierzig`` (0-999)."""
    from num2words import num2words

    name, _, code = LANGUAGE_INFO[lang]
    numbers = list(range(1000))
    rng.shuffle(numbers)
    for n in numbers:
        yield f"Write {n} in {name} words.", clean(num2words(n, lang=code))


# --- 2. date: ISO date to the long localized date ------------------------------------


def date(lang: str, rng: random.Random) -> Iterator[Example]:
    """``Write 2023-04-17 as a long date in German.`` -> ``17. April 2023`` (CLDR 'long')."""
    from babel.dates import format_date

    name, locale, _ = LANGUAGE_INFO[lang]
    first = datetime.date(1900, 1, 1).toordinal()
    last = datetime.date(2099, 12, 31).toordinal()
    while True:
        d = datetime.date.fromordinal(rng.randint(first, last))
        target = clean(format_date(d, format="long", locale=locale))
        yield f"Write {d.isoformat()} as a long date in {name}.", target


# --- 3. units: a measurement with an abbreviated unit, spelled out -------------------

# Abbreviation -> CLDR unit id. Only units whose long names exist in CLDR for all
# eight languages (babel 2.18 lacks e.g. the Dutch long name of duration-hour).
UNITS: dict[str, str] = {
    "km": "length-kilometer",
    "m": "length-meter",
    "cm": "length-centimeter",
    "mm": "length-millimeter",
    "mi": "length-mile",
    "kg": "mass-kilogram",
    "g": "mass-gram",
    "lb": "mass-pound",
    "l": "volume-liter",
    "ml": "volume-milliliter",
    "min": "duration-minute",
    "s": "duration-second",
    "km/h": "speed-kilometer-per-hour",
    "°C": "temperature-celsius",
    "m²": "area-square-meter",
}


def units(lang: str, rng: random.Random) -> Iterator[Example]:
    """``Spell out the unit in Polish: 5 km`` -> ``5 kilometrów`` (number 1-99 kept as digits).

    The target needs the unit's name in the language and its plural form for the
    number (CLDR plural rules: Polish has one / few / many, German often none).
    """
    from babel.units import format_unit

    name, locale, _ = LANGUAGE_INFO[lang]
    abbrevs = list(UNITS)
    while True:
        n = rng.randint(1, 99)
        abbrev = abbrevs[rng.randrange(len(abbrevs))]
        target = clean(format_unit(n, UNITS[abbrev], length="long", locale=locale))
        yield f"Spell out the unit in {name}: {n} {abbrev}", target


# --- 4. name: a localized person name reformatted as "Surname, I." -------------------


def name(lang: str, rng: random.Random) -> Iterator[Example]:
    """``Write the name as surname, initial: Anna Schmidt`` -> ``Schmidt, A.``

    Names come from the language's Faker provider; compound given names and
    multi-word surnames (``Anne-Kathrin``, ``van der Berg``) are skipped so the
    rule stays one rule.
    """
    fake = _faker(lang, rng)
    while True:
        given, family = clean(fake.first_name()), clean(fake.last_name())
        if " " in given or "-" in given or " " in family:
            continue
        yield f"Write the name as surname, initial: {given} {family}", f"{family}, {given[0]}."


# --- 5. address: extract the city from a localized postal address -------------------

# One-line address layouts following each country's postal convention: the city
# follows the postcode, except in US addresses (city, state, ZIP) and Italian ones
# (a province code follows the city).
_ADDRESS_LAYOUTS: dict[str, str] = {
    "en": "{street}, {city}, {region} {postcode}",
    "de": "{street}, {postcode} {city}",
    "es": "{street}, {postcode} {city}",
    "fr": "{street}, {postcode} {city}",
    "it": "{street}, {postcode} {city} ({region})",
    "pt": "{street}, {postcode} {city}",
    "nl": "{street}, {postcode} {city}",
    "pl": "{street}, {postcode} {city}",
}
# Faker's secondary units ("Apt. 421", "Suite 9", "Piso 3", "Appartamento 17") are
# dropped: they cost tokens and add nothing to the task.
_SECONDARY_UNIT = re.compile(r"\s+(Apt\.|Suite|Piso|Puerta|Piano|Appartamento)\s+\S+$")
_MAX_EXAMPLE_BYTES = 76
_IT_POSTAL = re.compile(r"(\S+), (.+) \((\w+)\)")


def address(lang: str, rng: random.Random) -> Iterator[Example]:
    """``Extract the city: Jopichstr. 98, 08016 Schrobenhausen`` -> ``Schrobenhausen``

    Streets, postcodes and cities come from the language's Faker address provider;
    examples (prompt + target) longer than 76 UTF-8 bytes are skipped (token budget:
    the city appears twice, and Polish diacritics cost extra tokens).
    """
    fake = _faker(lang, rng)
    layout = _ADDRESS_LAYOUTS[lang]
    while True:
        street = _SECONDARY_UNIT.sub("", clean(fake.street_address()))
        if lang == "it":
            # it_IT's city() draws from a list built from a set (order depends on
            # PYTHONHASHSEED); its geonames postcode table is ordered and consistent.
            postcode, city, region = _IT_POSTAL.fullmatch(fake.postcode_city_province()).groups()
            city = clean(city)
        else:
            city = clean(fake.city())
            region = fake.state_abbr() if "{region}" in layout else ""
            postcode = fake.postcode()
        text = layout.format(street=street, city=city, region=region, postcode=postcode)
        prompt = f"Extract the city: {text}"
        if len((prompt + city).encode("utf-8")) > _MAX_EXAMPLE_BYTES:
            continue
        yield prompt, city


GENERATORS: dict[str, Generator] = {
    "numwords": numwords,
    "date": date,
    "units": units,
    "name": name,
    "address": address,
}
