"""Dataset builders: ImageNet-layout trees, map files and ClickMe shards to TFRecords.

Command-line entry points: `python -m tfrecords.make_tiny` (the tiny composite set),
`python -m tfrecords.build` and `python -m tfrecords.verify`. See docs/datasets.md.
"""
