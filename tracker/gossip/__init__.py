"""Gossip between trackers: the state snapshot format (``snapshot``); merge rules and transport to come.

Everything here names peers, contents and origin nodes by their external keys, never by surrogate ids,
which are local to one database.
"""
