"""The public projections admin responses and audit records are built from: never a secret (API key, client
secret, operator token, any digest, any private key). Each record type's own ``public()`` decides what it shows;
these add what an audit record needs to stand on its own."""

from __future__ import annotations

from typing import Any

from serving.admin.operators import Operator
from serving.commerce.credits import CreditGrant
from serving.identity.clients import OAuthClient
from serving.identity.signing import PublicKey
from serving.partners.records import Partner
from serving.partners.store import StoredKey
from serving.plans import Plan

View = dict[str, Any]


def partner_view(partner: Partner) -> View:
    return {"id": partner.id, "name": partner.name, "plan": partner.plan, "disabled": partner.disabled}


def key_view(key: StoredKey) -> View:
    return {**key.public(), "partner_id": key.partner_id}


def client_view(client: OAuthClient) -> View:
    return client.public()


def plan_view(plan: Plan) -> View:
    return plan.as_dict()


def operator_view(operator: Operator) -> View:
    return operator.public()


def signing_key_view(key: PublicKey, signing: bool) -> View:
    """Public information only: the key id, when it was made, and whether it is the one signing new tokens."""
    return {"kid": key.kid, "created_at": key.created_at, "signing": signing}


def credit_view(grant: CreditGrant) -> View:
    return grant.public()
