"""Deterministic reply text, seeds derived from request hashes, the token estimate (~4 characters a token)."""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

__all__ = ["count_tokens", "request_digest", "rng_for", "words"]

_VOCABULARY = [
    "alpha",
    "amber",
    "anchor",
    "apple",
    "arrow",
    "atlas",
    "autumn",
    "basil",
    "beacon",
    "birch",
    "bridge",
    "cactus",
    "canyon",
    "cedar",
    "cipher",
    "clover",
    "comet",
    "copper",
    "coral",
    "cosmos",
    "crystal",
    "delta",
    "desert",
    "dune",
    "echo",
    "ember",
    "falcon",
    "fern",
    "fjord",
    "forest",
    "galaxy",
    "garnet",
    "glacier",
    "granite",
    "harbor",
    "hazel",
    "horizon",
    "iris",
    "island",
    "ivory",
    "jade",
    "jasmine",
    "juniper",
    "lagoon",
    "lantern",
    "lava",
    "lemon",
    "lotus",
    "maple",
    "marble",
    "meadow",
    "meteor",
    "mint",
    "nebula",
    "oasis",
    "ocean",
    "olive",
    "onyx",
    "orbit",
    "orchid",
    "pebble",
    "pepper",
    "pine",
    "planet",
    "prairie",
    "quartz",
    "quill",
    "rain",
    "raven",
    "reef",
    "river",
    "saffron",
    "sage",
    "sierra",
    "silver",
    "spruce",
    "summit",
    "thistle",
    "thunder",
    "tide",
    "topaz",
    "tundra",
    "valley",
    "velvet",
    "willow",
    "zephyr",
]


def words(rng: random.Random, count: int) -> list[str]:
    return [_VOCABULARY[rng.randrange(len(_VOCABULARY))] for _ in range(count)]


def count_tokens(text: str) -> int:
    """About four characters a token, at least one."""
    return max(1, (len(text) + 3) // 4)


def request_digest(parts: Any) -> bytes:
    """A stable hash of JSON-able ``parts`` (key order does not matter)."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode()).digest()


def rng_for(digest: bytes, *salt: object) -> random.Random:
    """A random stream fixed by ``digest`` and ``salt`` (e.g. the choice index)."""
    if salt:
        digest = hashlib.sha256(digest + repr(salt).encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))
