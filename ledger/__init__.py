"""The ledger: prepaid credit buckets in Redis (Lua), journaled to SQLite, with the ops CLI."""
