"""Code the server, the trainer and the client share: errors, result types, config loading, image
encoding, shared-memory segments, protocol keys, tiny test models. Imports none of them."""
