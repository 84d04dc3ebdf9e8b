"""Host-side objects (a tokenizer) carried by a module without becoming part of its jit cache key."""


class HostAttachment:
    """Holds ``obj``. Static nnx attributes enter the graphdef, which keys jit caches; a tokenizer compares by
    identity, so every load would compile anew. This holder hashes and compares as a constant instead."""

    def __init__(self, obj=None):
        self.obj = obj

    def __hash__(self):
        return 0

    def __eq__(self, other):
        return isinstance(other, HostAttachment)
