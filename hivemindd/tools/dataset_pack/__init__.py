"""``hmctl dataset pack``: turn an image dataset on disk into shuffled WebDataset tar shards.

Sources: an ImageFolder tree (SRC/<class>/<image>), CIFAR-10 python batches, Tiny-ImageNet-200,
and a flat ImageNet val folder with a labels file. Images are stored as their original bytes
(CIFAR's raw arrays are encoded once, as PNG). The global shuffle depends only on the sorted
sample keys and ``--seed``, so shard i always holds the same samples: a rerun skips the shards
that are already complete and rewrites the rest. Shards are byte-for-byte reproducible (fixed
tar metadata), which is what makes the local size check a completeness check.

That is only true of a rerun of the *same* pack, so ``<prefix>.manifest.json`` beside the shards
records which pack owns the prefix (source, format, split, seed, shard size, a fingerprint of the
samples), and any other pack into that prefix is refused before a byte is written. Shards from
before manifests are adopted only when each one starts with the sample this pack puts there.

- ``sources``: each layout read into a ``Source`` (class names, samples, how to read their bytes);
- ``shards``: the global shuffle and the reproducible tar bytes of a shard;
- ``manifest``: the manifest, and the rules that refuse another pack's prefix or classes;
- ``destinations``: a local folder or ``gs://bucket/prefix``;
- ``command``: the click ``dataset`` group and its ``pack`` command.

Imports: the standard library and click at import time (hmctl imports the command on every call);
PIL and numpy (CIFAR) and google-cloud-storage (gs://) only inside the functions that need them.
Like the rest of tools/, nothing from host, api or trainer.
"""
