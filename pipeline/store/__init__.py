"""Cache storage, in layers: names (``layout``), durable file primitives (``atomic``), the
shard writer (``writer``), the in-progress journal, lock and run log (``journal``) and the
reader that checks everything it returns (``reader``). Only this package opens shard files.
"""
