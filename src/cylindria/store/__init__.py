"""The journal (every job, in a SQLite state file or in PostgreSQL) and the input files."""
