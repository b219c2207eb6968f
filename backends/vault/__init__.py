"""Vault / OpenBao: transit keys and the state in KV v2."""
