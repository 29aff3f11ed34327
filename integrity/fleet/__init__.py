"""Fleets: many hosts' records in one PostgreSQL, and what only a central place can see.

Each host keeps working on its local SQLite database, which doubles as the spool
(store/spool.py): what the central copy lacks is pushed in order and idempotently
(`push`, from `integrity fleet push` or the watcher's `thread`). The central database
(store/central/, its own schema and migrations) checks on arrival that each host's
event chain extends what it holds and that its sealed generation only grows, and
flags a host whose local database was rolled back or rewritten, or whose baseline
root changed without an approval. The admin side (`admin`, `status`, `drift`,
`monitor`, `report`) enrols hosts, reports, requests approvals and alerts when a host
goes silent. Nothing here speaks SQL: the store does.
"""
