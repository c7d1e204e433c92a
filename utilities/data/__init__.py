"""The data: what a record is and how a dataset version reaches the model.

`schema` (the record: image, 28 metadata columns in the original's order, 8 one-hot labels) and
`manifest` (`versioned_paths.pickle`, read by `manifest_pickle`'s safe unpickler) are plain Python, so
tools and `--help` never load TensorFlow; `isic` reads and checks an ISIC 2019 folder (CSVs, images) and
`lesion_split` splits its records by lesion, for `tools.prepare`; `shards` fetches and checks a shard, `records` parses it,
`augmentation` perturbs training batches, `pipeline` builds the train/val/test `tf.data` datasets and
the class weights, and `feature_cache` turns a frozen backbone's features into a dataset of their own.
Only `feature_cache` reads the run's `Config` and the model's layer names (it trains the head on
cached features); the rest knows nothing of runs, models or metrics.
"""
