"""The usage ledger: one durable record per admitted request."""
