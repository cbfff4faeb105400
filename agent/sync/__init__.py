"""Folder sync: version vectors, index, planner and messages (pure); scanner, puller and fs (disk edge).

The daemon drives one `agent.sync.engine.SyncEngine` per folder; see that module's header.
"""
