"""The journal: every job kept in a SQLite file behind the in-memory registry."""
