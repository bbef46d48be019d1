"""Schemathesis hooks for this server: load with `SCHEMATHESIS_HOOKS=schemathesis_hooks` (tests/ on
PYTHONPATH) and run with `--exclude-checks positive_data_acceptance`.

Schema-valid requests must be accepted, as schemathesis' own `positive_data_acceptance` demands,
except those that break a limit JSON Schema cannot state; the server refuses these with a 400
whose `code` names the limit, and the schema's 400 description lists them.
"""

from __future__ import annotations

import json

import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

CROSS_FIELD_LIMITS = frozenset({"context_length_exceeded", "prompt_too_long", "invalid_conversation"})


def _error_code(response) -> str | None:
    try:
        return json.loads(response.content)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


@schemathesis.check
def positive_data_acceptance_within_stated_limits(ctx, response, case):
    """positive_data_acceptance, but a 400 for one of the documented cross-field limits is an answer."""
    if response.status_code == 400 and _error_code(response) in CROSS_FIELD_LIMITS:
        return None
    return positive_data_acceptance(ctx, response, case)
