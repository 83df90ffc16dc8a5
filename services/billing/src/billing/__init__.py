"""Usage billing: the gateway's per-partner Prometheus counters in, invoices out, reconciled with the ledger."""
