"""Usage alerts by webhook: partners register endpoints and thresholds; each gateway replica evaluates month-to-date
usage against them and delivers signed, retried, idempotent events (docs/api.md, decision 0018)."""
