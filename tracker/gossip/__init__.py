"""Gossip between trackers (docs/gossip.md): the state snapshot format (``snapshot``, ``files``), the
signed message format (``protocol``), the exchange and its loop (``agent``), settings (``config``) and
snapshot import (``importer``).

Everything here names peers, contents and origin nodes by their external keys, never by surrogate ids,
which are local to one database.
"""
