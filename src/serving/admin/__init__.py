"""Administration: named operators with roles, the append-only audit log, and the one service that changes the
partner store on their behalf (used by the admin HTTP API and the ``serving`` CLI alike)."""
