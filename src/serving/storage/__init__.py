"""The one data-access layer: SQLite by default, PostgreSQL at scale, with schema migrations."""
