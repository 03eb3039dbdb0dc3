"""Near-duplicate removal: MinHash-LSH and SimHash over Ray Data.

Modules, in the order the data flows:
  config      NearDedupConfig (`near_dedup:` section of a data run)
  shingles    char / word / jieba n-gram hashes of a batch, vectorised
  minhash     signatures, LSH band keys, band layout from a threshold
  simhash     64-bit fingerprints, pigeonhole block keys
  steps       batch functions over the corpus (Signer, Bander, buckets, Mark)
  verify      exact Jaccard (or containment) verification of candidate pairs
  graph       bucket stars, components inside a partition, large/small-star steps
  components  distributed connected components (Ray Data rounds)
  job         the Ray Data wiring (`near_dedup(ds, cfg, ...)`)
  run         the standalone job `zerolm data near-dedup`
  labelled    labelled near-duplicate sets from real text, and pair metrics
Only job.py, components.py and run.py touch Ray Data; the rest is numpy/pyarrow.
"""
